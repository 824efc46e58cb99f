"""Liveness (the process answers) and readiness (database, schema and broker answer too)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from service.api.deps import SettingsDep
from service.api.problems import problem_response
from service.config import Settings
from service.db import get_engine, schema_is_at_head
from service.schemas import Check, Readiness

router = APIRouter(tags=["health"])
BROKER_TIMEOUT_SECONDS = 1.0


def check_database(settings: Settings) -> Check:
    """Whether a connection to the database runs a query."""
    try:
        with get_engine(settings.database_url).connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        return Check(ok=False, detail=_unreachable(exc))
    return Check(ok=True, detail="reachable")


def _unreachable(exc: Exception) -> str:
    first_line = (str(exc).splitlines() or [""])[0][:200]
    return f"unreachable: {type(exc).__name__}: {first_line}"


def check_migrations(settings: Settings) -> Check:
    """Whether the schema is at the newest migration."""
    if schema_is_at_head(get_engine(settings.database_url)):
        return Check(ok=True, detail="at head")
    return Check(ok=False, detail="not at the newest migration (run the migrations), or unreachable")


def check_broker(settings: Settings) -> Check:
    """Whether the broker answers: a Redis ping, the embedded broker's folders, or a kombu connection."""
    url = settings.broker_url
    try:
        if settings.uses_filesystem_broker():
            missing = [f for f in settings.broker_transport_options().values() if not Path(f).is_dir()]
            return Check(ok=not missing, detail=f"missing folders: {missing}" if missing else "folders present")
        if url.startswith(("redis://", "rediss://", "unix://")):
            import redis

            client = redis.Redis.from_url(url, socket_connect_timeout=BROKER_TIMEOUT_SECONDS,
                                          socket_timeout=BROKER_TIMEOUT_SECONDS)
            with client:
                client.ping()
        else:
            from kombu import Connection

            with Connection(url, connect_timeout=BROKER_TIMEOUT_SECONDS) as connection:
                connection.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_SECONDS)
    except Exception as exc:  # each client fails in its own way; all mean "not reachable"
        return Check(ok=False, detail=_unreachable(exc))
    return Check(ok=True, detail="reachable")


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive (always 200)."""
    return {"status": "alive"}


@router.get("/readyz", response_model=Readiness, responses={503: {"description": "a check failed"}})
def readyz(settings: SettingsDep, request: Request) -> Readiness | JSONResponse:
    """Ready when the database answers, its schema is current and the broker answers; else 503."""
    checks = {"database": check_database(settings), "migrations": check_migrations(settings),
              "broker": check_broker(settings)}
    failed = [name for name, check in checks.items() if not check.ok]
    if not failed:
        return Readiness(status="ready", checks=checks)
    return problem_response(request, 503, f"not ready: {', '.join(failed)} failed", "not-ready",
                            checks={name: check.model_dump() for name, check in checks.items()})
