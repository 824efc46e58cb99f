"""Helpers shared by the API tests: settings and clients on a given database, problem checks, specs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from service.db import get_engine, migrate_to_head
from service.models import Base

TRAIN_SPEC: dict[str, Any] = {"kind": "train", "model": "resnet8", "dataset": {"name": "digits"}}


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


@contextmanager
def api_client(settings: Settings) -> Iterator[TestClient]:
    """A TestClient of the app for `settings`, its lifespan running."""
    with TestClient(create_app(settings)) as client:
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
