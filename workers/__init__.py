"""Celery app and thin tasks: take a job id, call engines/, record results in SQL."""
