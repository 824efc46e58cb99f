"""Celery workers that run training jobs."""
