"""Service commands of the `itrd` CLI: migrate, api, worker, serve (embedded), demo and keys."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from typing import Any

import click


@click.command()
def migrate() -> None:
    """Bring the database schema to the newest migration."""
    from service.config import get_settings
    from service.db import migrate_to_head

    settings = get_settings()
    settings.ensure_state_dirs()
    migrate_to_head(settings.database_url)
    click.echo(f"database at head: {_safe_url(settings.database_url)}")


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--migrate/--no-migrate", "run_migrations", default=True, show_default=True,
              help="Apply migrations before serving (compose runs a separate migration step instead).")
def api(host: str, port: int, run_migrations: bool) -> None:
    """Serve the HTTP API (uvicorn)."""
    import uvicorn

    from service.config import get_settings
    from service.db import migrate_to_head
    from service.logs import configure_logging

    settings = get_settings()
    settings.ensure_state_dirs()
    if run_migrations:
        migrate_to_head(settings.database_url)
    configure_logging()
    # log_config=None: uvicorn's loggers go through the root handler, as JSON lines like the rest.
    uvicorn.run("service.api.app:create_app", factory=True, host=host, port=port, log_config=None)


def worker_argv(queue: str, name: str | None) -> list[str]:
    """Celery worker arguments: one job at a time in the worker's own process, one message prefetched."""
    return ["worker", "--pool", "solo", "--concurrency", "1", "--prefetch-multiplier", "1",
            "--queues", queue, "--hostname", name or f"itrd-{queue}@%h",
            "--loglevel", "INFO", "--without-gossip", "--without-mingle"]


@click.command()
@click.option("--queue", default=None, help="Queue to consume (default: the settings' queue for --device).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device kind this worker serves; run one worker per GPU (set CUDA_VISIBLE_DEVICES).")
@click.option("--name", default=None, help="Celery node name.")
def worker(queue: str | None, device: str, name: str | None) -> None:
    """Run one Celery worker that trains one job at a time."""
    from service.config import get_settings
    from service.logs import configure_logging
    from worker.celery_app import app

    configure_logging()
    settings = get_settings()
    settings.ensure_state_dirs()
    q = queue or settings.queue_for(device)  # type: ignore[arg-type]
    app.worker_main(worker_argv(q, name))


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
def serve(host: str, port: int) -> None:
    """Embedded mode: migrate, then run the API and one worker on this machine (SQLite, file broker)."""
    from service.config import get_settings
    from service.db import migrate_to_head

    settings = get_settings()
    settings.ensure_state_dirs()
    migrate_to_head(settings.database_url)
    worker_proc = subprocess.Popen([sys.executable, "-m", "itrd", "worker", "--device", settings.default_device])
    api_proc = subprocess.Popen([sys.executable, "-m", "itrd", "api", "--host", host, "--port", str(port),
                                 "--no-migrate"])
    click.echo(f"itrd serving on http://{host}:{port} (docs at /docs), state in {settings.state_dir}")

    def stop(*_: Any) -> None:
        for proc in (api_proc, worker_proc):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    try:
        while api_proc.poll() is None and worker_proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                api_proc.wait(timeout=1.0)
    except KeyboardInterrupt:
        pass
    finally:
        stop()
        for proc in (api_proc, worker_proc):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _safe_url(url: str) -> str:
    # Never print a password that came in with the URL.
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def register(group: click.Group) -> None:
    """Add the service commands to the `itrd` command group."""
    from service.demo import demo
    from service.keys_cli import keys

    for command in (migrate, api, worker, serve, demo, keys):
        group.add_command(command)
