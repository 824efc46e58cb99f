"""Idempotency-Key on POST /v1/jobs and POST /v1/teachers: a retried request never makes a second resource."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from api_support import (
    OWNER,
    TRAIN_SPEC,
    api_settings,
    assert_problem,
    bearer,
    broker_messages,
    empty_tables,
    error_locs,
    make_key,
    uvicorn_server,
)
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from itrd.models import create_model
from service.config import Settings
from service.db import get_engine
from service.models import IdempotencyRecord, Job, TeacherUpload

CONCURRENT = 20


@pytest.fixture
def settings(pg_url: str, tmp_path: Path) -> Iterator[Settings]:
    """Embedded settings on PostgreSQL."""
    yield api_settings(tmp_path / "state", pg_url)
    empty_tables(pg_url)


def count(url: str, model: type[Any]) -> int:
    """Rows of a table."""
    with Session(get_engine(url)) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_a_repeated_submit_answers_with_the_first_job(client: TestClient, settings: Settings) -> None:
    once = {"Idempotency-Key": "submit-1"}
    first = client.post("/v1/jobs", json=TRAIN_SPEC, headers=once)
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    # The same request, its fields written in another order and a default spelled out: the same spec.
    again = client.post("/v1/jobs", json={"seed": 0, **dict(reversed(TRAIN_SPEC.items()))}, headers=once)
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"] and again.headers["location"] == first.headers["location"]
    assert count(settings.database_url, Job) == 1 and len(broker_messages(settings)) == 1

    changed = client.post("/v1/jobs", json={**TRAIN_SPEC, "seed": 1}, headers=once)
    body = assert_problem(changed, 422, "idempotency-key-reused")
    assert "different request" in body["detail"] and "submit-1" in body["detail"]
    assert count(settings.database_url, Job) == 1

    # Keys are per owner, and without a key every request is a new job.
    other = client.post("/v1/jobs", json=TRAIN_SPEC, headers={**once, **bearer(make_key(settings.database_url, "bob"))})
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    assert client.post("/v1/jobs", json=TRAIN_SPEC).json()["id"] != first.json()["id"]
    assert count(settings.database_url, Job) == 3


def test_a_refused_submit_leaves_the_key_free(client: TestClient, settings: Settings) -> None:
    once = {"Idempotency-Key": "k"}
    bad = client.post("/v1/jobs", json={**TRAIN_SPEC, "dataset": {"name": "digits", "root": "/etc"}}, headers=once)
    assert_problem(bad, 422, "validation")
    assert count(settings.database_url, IdempotencyRecord) == 0
    assert client.post("/v1/jobs", json=TRAIN_SPEC, headers=once).status_code == 201
    too_long = assert_problem(client.post("/v1/jobs", json=TRAIN_SPEC, headers={"Idempotency-Key": "x" * 256}), 422)
    assert error_locs(too_long) == [["header", "Idempotency-Key"]]


def test_a_repeated_teacher_upload_answers_with_the_first(client: TestClient, settings: Settings) -> None:
    buffer = io.BytesIO()
    torch.save(create_model("resnet8", 10).state_dict(), buffer)
    weights = buffer.getvalue()

    def upload(content: bytes, num_classes: int = 10) -> httpx.Response:
        return client.post("/v1/teachers", data={"architecture": "resnet8", "num_classes": str(num_classes)},
                           files={"file": ("t.pt", content)}, headers={"Idempotency-Key": "teacher"})

    first, again = upload(weights), upload(weights)
    assert first.status_code == again.status_code == 201, first.text
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert count(settings.database_url, TeacherUpload) == 1
    assert_problem(upload(weights + b"\0"), 422, "idempotency-key-reused")
    assert_problem(upload(weights, num_classes=100), 422, "idempotency-key-reused")
    stored = Path(settings.artifact_store.removeprefix("file://"))
    assert len(list(stored.glob("upload-*/*"))) == 1


def test_concurrent_identical_submits_make_one_job(pg_url: str, tmp_path: Path) -> None:
    key = make_key(pg_url, OWNER)
    env = {"ITRD_STATE_DIR": str(tmp_path / "state"), "ITRD_DATABASE_URL": pg_url, "ITRD_REAPER_IN_API": "false"}
    barrier = threading.Barrier(CONCURRENT)
    answers: list[httpx.Response] = []
    lock = threading.Lock()
    try:
        with uvicorn_server(env, tmp_path / "uvicorn.log") as base, httpx.Client(
            base_url=base, timeout=60, headers={**bearer(key), "Idempotency-Key": "burst"},
            limits=httpx.Limits(max_connections=CONCURRENT),
        ) as http:

            def submit() -> None:
                barrier.wait()
                answer = http.post("/v1/jobs", json=TRAIN_SPEC)
                with lock:
                    answers.append(answer)

            threads = [threading.Thread(target=submit) for _ in range(CONCURRENT)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
        assert len(answers) == CONCURRENT
        assert {a.status_code for a in answers} == {201}, [a.text for a in answers if a.status_code != 201]
        assert len({a.json()["id"] for a in answers}) == 1
        assert sum(a.headers.get("idempotent-replayed") == "true" for a in answers) == CONCURRENT - 1
        assert count(pg_url, Job) == 1 and count(pg_url, IdempotencyRecord) == 1
    finally:
        empty_tables(pg_url)
