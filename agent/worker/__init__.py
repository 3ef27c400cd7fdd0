"""The local Celery worker: remote control, broker settings, its boot gate."""
