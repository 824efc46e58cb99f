"""The Celery application: broker and behaviour from the service settings, tasks in worker.tasks."""

from __future__ import annotations

from celery import Celery

from service.config import Settings, get_settings

RUN_JOB = "worker.tasks.run_job"


def make_celery(settings: Settings | None = None) -> Celery:
    """A Celery app for `settings`: late acks, one message prefetched, JSON only, no result backend."""
    s = settings or get_settings()
    app = Celery("itrd", broker=s.broker_url, include=["worker.tasks"])
    filesystem = s.uses_filesystem_broker()
    app.conf.update(
        broker_transport_options={
            **s.broker_transport_options(),
            # A message unacked this long (its worker died) is delivered again; the lease makes the
            # second delivery a no-op while the first still runs.
            **({} if filesystem else {"visibility_timeout": 6 * 3600}),
        },
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=s.broker_timeout_seconds,
        task_default_queue=s.cpu_queue,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_hijack_root_logger=False,
        # The filesystem transport has no fanout exchange for broadcast commands.
        worker_enable_remote_control=not filesystem,
        worker_send_task_events=False,
    )
    return app


app = make_celery()
