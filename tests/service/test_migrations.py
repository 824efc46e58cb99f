"""Alembic migrations, engines and the settings that locate them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pydantic import ValidationError
from sqlalchemy import inspect, text

from service.config import Settings, get_settings
from service.db import (
    MIGRATIONS_DIR,
    alembic_config,
    get_engine,
    make_engine,
    migrate_to_head,
    normalize_url,
    schema_is_at_head,
)
from service.models import Base

REPO = MIGRATIONS_DIR.parent
TABLES = {"jobs", "job_events", "metrics", "artifacts", "teacher_uploads", "api_keys", "idempotency_keys",
          "callback_deliveries"}


def test_upgrade_and_downgrade(empty_url: str) -> None:
    url = empty_url
    engine = make_engine(url)
    try:
        assert not schema_is_at_head(engine)
        migrate_to_head(url)
        assert schema_is_at_head(engine)
        assert set(inspect(engine).get_table_names()) >= TABLES
        with engine.connect() as connection:
            # The models and the migrations describe the same schema.
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        command.downgrade(alembic_config(url), "base")
        assert not schema_is_at_head(engine)
        assert not TABLES & set(inspect(engine).get_table_names())
        migrate_to_head(url)
        assert schema_is_at_head(engine)
    finally:
        engine.dispose()


def test_schema_is_not_at_head_when_database_is_unreachable() -> None:
    engine = make_engine("postgresql://nobody@127.0.0.1:1/none", connect_args={"connect_timeout": 2})
    assert not schema_is_at_head(engine)


def test_migrate_uses_the_settings_database() -> None:
    migrate_to_head()
    settings = get_settings()
    assert (settings.state_dir / "itrd.db").is_file()
    assert schema_is_at_head(get_engine())


def test_alembic_command_line_reads_the_settings(tmp_path: Path) -> None:
    env = {**os.environ, "ITRD_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}"}
    alembic = [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini")]
    subprocess.run([*alembic, "upgrade", "head"], cwd=tmp_path, env=env, check=True, capture_output=True)
    assert schema_is_at_head(make_engine(env["ITRD_DATABASE_URL"]))
    env["ITRD_DATABASE_URL"] = "postgresql://user@db.invalid/itrd"
    offline = subprocess.run(
        [*alembic, "upgrade", "head", "--sql"],
        cwd=tmp_path, env=env, check=True, capture_output=True, text=True,
    )
    assert "CREATE TABLE jobs" in offline.stdout and "JSONB" in offline.stdout


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:p@h:5432/d", "postgresql+psycopg://u:p@h:5432/d"),
        ("postgres://u@h/d", "postgresql+psycopg://u@h/d"),
        ("postgresql+psycopg://u@h/d", "postgresql+psycopg://u@h/d"),
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
    ],
)
def test_normalize_url(url: str, expected: str) -> None:
    assert normalize_url(url) == expected


def test_sqlite_engine_pragmas(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'deep' / 'dir' / 'x.db'}")
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA busy_timeout")).scalar() == 30_000
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    engine.dispose()


# Settings: where the records, the broker and the artifacts live.


def test_settings_derive_from_state_dir(tmp_path: Path) -> None:
    settings = get_settings()
    state = (tmp_path / "state").resolve()
    assert settings.state_dir == state
    assert settings.database_url == f"sqlite:///{state / 'itrd.db'}"
    assert settings.broker_url == "filesystem://"
    assert settings.artifact_store == f"file://{state / 'artifacts'}"
    assert settings.data_dirs == [state / "data"]
    assert (settings.lease_seconds, settings.heartbeat_seconds, settings.max_attempts) == (60, 10, 3)
    assert settings.upload_max_bytes == 512 * 1024 * 1024
    assert settings.broker_transport_options() == {
        "data_folder_in": str(state / "broker" / "queue"),
        "data_folder_out": str(state / "broker" / "queue"),
        "data_folder_processed": str(state / "broker" / "processed"),
    }
    assert (settings.queue_for("cpu"), settings.queue_for("cuda")) == ("cpu", "cuda")
    assert get_settings() is settings
    settings.ensure_state_dirs()
    assert (state / "broker" / "queue").is_dir() and (state / "artifacts").is_dir()


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ITRD_DATABASE_URL", "postgresql://itrd@db/itrd")
    monkeypatch.setenv("ITRD_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("ITRD_ARTIFACT_STORE", "s3://bucket/runs")
    monkeypatch.setenv("ITRD_DATA_DIRS", '["/data/a", "/data/b"]')
    monkeypatch.setenv("ITRD_LEASE_SECONDS", "30")
    settings = Settings()
    assert settings.database_url == "postgresql://itrd@db/itrd"
    assert settings.artifact_store == "s3://bucket/runs"
    assert settings.data_dirs == [Path("/data/a"), Path("/data/b")]
    assert settings.lease_seconds == 30
    assert settings.broker_transport_options() == {}


def test_production_refuses_embedded_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ITRD_ENVIRONMENT", "production")
    with pytest.raises(ValidationError) as err:
        Settings()
    for name in ("DATABASE_URL", "BROKER_URL", "ARTIFACT_STORE", "SECRET_KEY"):
        assert f"ITRD_{name}" in str(err.value)
    monkeypatch.setenv("ITRD_DATABASE_URL", "postgresql://itrd@db/itrd")
    monkeypatch.setenv("ITRD_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("ITRD_ARTIFACT_STORE", "s3://bucket")
    with pytest.raises(ValidationError, match="ITRD_SECRET_KEY"):
        Settings()
    monkeypatch.setenv("ITRD_SECRET_KEY", "s3cret")
    assert Settings().environment == "production"


def test_heartbeat_must_be_shorter_than_the_lease() -> None:
    with pytest.raises(ValidationError, match="heartbeat_seconds"):
        Settings(lease_seconds=10, heartbeat_seconds=10)
