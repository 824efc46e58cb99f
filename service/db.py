"""Database engines and sessions built from the settings, and Alembic run from code."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service.config import get_settings

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def normalize_url(url: str) -> str:
    """Point Postgres URLs at the psycopg 3 driver (`postgresql://` and `postgres://` included)."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url.removeprefix(scheme)
    return url


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Per-connection SQLite setup: WAL lets readers run beside the writer; busy_timeout queues writers."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    # Durable at every checkpoint, and in WAL mode a crash cannot corrupt the file.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str | None = None, **kwargs: Any) -> Engine:
    """A new engine for `url` (default: the settings' database_url), set up for its backend."""
    url = normalize_url(url or get_settings().database_url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # Threads of the API and the worker's heartbeat share pooled connections.
        engine = create_engine(url, connect_args={"check_same_thread": False}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def get_engine(url: str | None = None) -> Engine:
    """The process's shared engine for `url` (default: the settings' database_url)."""
    key = normalize_url(url or get_settings().database_url)
    with _engines_lock:
        if key not in _engines:
            _engines[key] = make_engine(key)
        return _engines[key]


def dispose_engines() -> None:
    """Close every shared engine's connections (at shutdown, and between tests)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back if it raises."""
    session = Session(engine or get_engine(), expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config for our migrations, aimed at `url` (default: the settings' database_url)."""
    # No ini file: alembic.ini's logging section would reconfigure the application's loggers.
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Passed as an attribute, not an ini option: '%' in a password would break ini interpolation.
    config.attributes["url"] = normalize_url(url or get_settings().database_url)
    return config


def migrate_to_head(url: str | None = None) -> None:
    """Apply every pending migration to the database at `url` (default: the settings' one)."""
    command.upgrade(alembic_config(url), "head")


@lru_cache(maxsize=1)
def _script_heads() -> frozenset[str]:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return frozenset(ScriptDirectory.from_config(config).get_heads())


def schema_is_at_head(engine: Engine | None = None) -> bool:
    """Whether the database is reachable and migrated to the newest revision (for /readyz)."""
    try:
        with (engine or get_engine()).connect() as connection:
            current = MigrationContext.configure(connection).get_current_heads()
    except SQLAlchemyError:
        return False
    return frozenset(current) == _script_heads()
