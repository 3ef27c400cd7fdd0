"""The Celery workers' own database user: least privilege instead of the master credentials."""
