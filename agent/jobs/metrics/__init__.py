"""`airflow-agent metrics`: Celery queue depth and the desired worker count to CloudWatch."""
