"""Fixtures of the service tests: throwaway databases on PostgreSQL and SQLite, migrated by Alembic.

PostgreSQL: each test session creates fresh `itrd_test_<random>` databases on the server named by
ITRD_TEST_POSTGRES_URL (default: the local one, user postgres) and drops them at the end. If that
server is unreachable the PostgreSQL cases are skipped, or fail when ITRD_TEST_REQUIRE_POSTGRES=1.
"""

from __future__ import annotations

import os
import secrets
import signal
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import Engine, make_url
from sqlalchemy.orm import Session
from stack_support import REDIS, Stack

from service.config import Settings, get_settings
from service.db import dispose_engines, get_engine, migrate_to_head
from service.models import Base, Job, JobStatus, new_id, utcnow

POSTGRES_URL = os.environ.get("ITRD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test reads settings from a clean environment with its own state_dir."""
    for key in list(os.environ):
        if key.startswith("ITRD_") and not key.startswith("ITRD_TEST_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("ITRD_STATE_DIR", str(tmp_path / "state"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def create_pg_database() -> Iterator[Callable[[], str]]:
    """A factory of fresh, empty PostgreSQL databases (URLs), all dropped when the session ends."""
    try:
        admin = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as err:
        message = f"PostgreSQL is not reachable at {POSTGRES_URL}: {err}"
        if os.environ.get("ITRD_TEST_REQUIRE_POSTGRES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    created: list[str] = []

    def create() -> str:
        name = f"itrd_test_{secrets.token_hex(6)}"
        admin.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)

    yield create
    dispose_engines()
    for name in created:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def _empty_database(backend: str, request: pytest.FixtureRequest, directory: Path) -> str:
    """An empty database of the backend: a new SQLite file in `directory`, or a new PG database."""
    if backend == "sqlite":
        return f"sqlite:///{directory / f'itrd-{secrets.token_hex(4)}.db'}"
    create: Callable[[], str] = request.getfixturevalue("create_pg_database")
    return create()


@pytest.fixture(params=BACKENDS)
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database with no tables, per backend (for the migration tests)."""
    return _empty_database(request.param, request, tmp_path)


@pytest.fixture(scope="session", params=BACKENDS)
def migrated_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A database per backend, migrated to head once per test session."""
    url = _empty_database(request.param, request, tmp_path_factory.mktemp("db"))
    migrate_to_head(url)
    return url


@pytest.fixture
def engine(migrated_url: str) -> Iterator[Engine]:
    """The migrated database's engine; every table is emptied after the test."""
    engine = get_engine(migrated_url)
    yield engine
    with engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    """A session on the migrated database (the test commits what it wants others to see)."""
    with Session(engine, expire_on_commit=False) as session:
        yield session


@pytest.fixture
def add_job(session: Session) -> Callable[..., Job]:
    """Insert a committed job directly in any status (test setup that bypasses the state machine)."""

    def add(status: JobStatus = JobStatus.queued, **fields: Any) -> Job:
        now = utcnow()
        values: dict[str, Any] = {
            "id": new_id(), "kind": "train", "spec": {"model": "resnet8"}, "status": status,
            "created_at": now, "queued_at": now, "max_attempts": 3,
        }
        if status in (JobStatus.running, JobStatus.cancelling):
            values.update(lease_owner="worker-0", lease_expires_at=now + timedelta(seconds=60),
                          started_at=now)
        values.update(fields)
        job = Job(**values)
        session.add(job)
        session.commit()
        return job

    return add


@pytest.fixture
def stack(tmp_path: Path, create_pg_database: Callable[[], str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    """A fresh PostgreSQL database and Redis database, a state dir and the env that names them; no worker yet."""
    db = create_pg_database()
    migrate_to_head(db)
    broker = f"{REDIS}/{secrets.randbelow(14) + 1}"
    redis.Redis.from_url(broker).flushdb()
    env_vars = {"ITRD_DATABASE_URL": db, "ITRD_BROKER_URL": broker, "ITRD_STATE_DIR": str(tmp_path / "state"),
                "ITRD_LEASE_SECONDS": "5", "ITRD_HEARTBEAT_SECONDS": "1", "ITRD_REAP_SECONDS": "1",
                "OMP_NUM_THREADS": "1"}
    for k, v in env_vars.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    logs = tmp_path / "logs"
    logs.mkdir()
    s = Stack(env={**os.environ}, engine=get_engine(db), logs=logs, workers=[])
    yield s
    for proc in s.workers:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    redis.Redis.from_url(broker).flushdb()


# The API test modules define `settings` (each with its own overrides); these build on it.
@pytest.fixture(scope="module")
def pg_url(request: pytest.FixtureRequest) -> str:
    """One migrated PostgreSQL database for the module (each module's `settings` empties it after a test)."""
    from api_support import pg_database

    return pg_database(request)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """A TestClient of the app for the module's `settings`, sending a key of api_support.OWNER."""
    from api_support import api_client

    with api_client(settings) as c:
        yield c


@pytest.fixture
def db(settings: Settings) -> Iterator[Session]:
    """A session on the module's test database, for setting up and checking rows directly."""
    with Session(get_engine(settings.database_url), expire_on_commit=False) as session:
        yield session
