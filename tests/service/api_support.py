"""Helpers shared by the API tests: settings and clients on a given database, problem checks, specs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.db import get_engine, migrate_to_head, session_scope
from service.keys import create_key
from service.models import Base

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90  # importing torch on a busy 2-core machine
TRAIN_SPEC: dict[str, Any] = {"kind": "train", "model": "resnet8", "dataset": {"name": "digits"}}
OWNER = "tester"  # whom api_client's key belongs to; rows a test adds directly must name it to be seen


def pg_database(request: pytest.FixtureRequest) -> str:
    """A fresh PostgreSQL database migrated to head (skips when PostgreSQL is not reachable)."""
    create: Callable[[], str] = request.getfixturevalue("create_pg_database")
    url = create()
    migrate_to_head(url)
    return url


def sqlite_database(directory: Path) -> str:
    """A fresh SQLite file migrated to head."""
    url = f"sqlite:///{directory / 'api.db'}"
    migrate_to_head(url)
    return url


def empty_tables(url: str) -> None:
    """Delete every row, so the next test starts from an empty database."""
    with get_engine(url).begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())


def api_settings(state_dir: Path, database_url: str, **overrides: Any) -> Settings:
    """Settings of an embedded deployment in `state_dir` on `database_url`, with no reaper thread."""
    values: dict[str, Any] = {"state_dir": state_dir, "database_url": database_url, "reaper_in_api": False,
                              "broker_timeout_seconds": 0.5}
    return Settings(**{**values, **overrides})


def make_key(database_url: str, owner: str = OWNER) -> str:
    """A new API key of `owner` in the database."""
    with session_scope(get_engine(database_url)) as session:
        return create_key(session, owner)[1]


def bearer(key: str) -> dict[str, str]:
    """The Authorization header that presents `key`."""
    return {"Authorization": f"Bearer {key}"}


@contextmanager
def api_client(settings: Settings, owner: str | None = OWNER) -> Iterator[TestClient]:
    """A TestClient of the app for `settings`, its lifespan running, sending a key of `owner` (None: no key)."""
    headers = bearer(make_key(settings.database_url, owner)) if owner is not None else None
    with TestClient(create_app(settings), headers=headers) as client:
        yield client


def broker_messages(settings: Settings) -> list[Path]:
    """The messages waiting in the embedded broker's queue folder."""
    return sorted((settings.broker_dir / "queue").glob("*.msg"))


ANY = "*"


def assert_problem(response: httpx.Response, status: int, slug: str | None = ANY) -> dict[str, Any]:
    """Check an RFC 9457 problem answer and return its body; slug None means type about:blank."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["title"] and body["detail"]
    assert body["instance"] == response.request.url.path
    if slug != ANY:
        assert body["type"] == (f"urn:itrd:problem:{slug}" if slug else "about:blank")
    return body


def error_locs(body: dict[str, Any]) -> list[list[Any]]:
    """The field locations a validation problem names."""
    return [e["loc"] for e in body["errors"]]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def uvicorn_server(env_vars: dict[str, str], log_path: Path) -> Iterator[str]:
    """A uvicorn process serving the app factory, configured only by `env_vars` (ITRD_*); yields its base URL.

    On leaving, it must shut down cleanly: the lifespan stops the reaper and uvicorn exits gracefully.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITRD_")}
    env.update(env_vars)
    port = free_port()
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "service.api.app:create_app",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "uvicorn did not answer in time"
            time.sleep(0.2)
        yield base
        proc.terminate()
        # uvicorn re-raises the signal once it has shut down, so -SIGTERM is a clean exit too.
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
