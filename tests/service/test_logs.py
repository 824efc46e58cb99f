"""Structured logs: JSON lines with the request id, which the API echoes and stores on the job it makes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from api_support import TRAIN_SPEC, api_client, api_settings
from sqlalchemy import select

from service.db import get_engine, session_scope
from service.logs import JsonFormatter, clean_request_id, job_id, request_id
from service.models import Job


def test_a_record_is_one_json_line_with_the_context_ids() -> None:
    token_r, token_j = request_id.set("req-1"), job_id.set("job-9")
    try:
        record = logging.LogRecord("worker", logging.WARNING, __file__, 1, "lease %s lost", ("x",), None)
        entry = json.loads(JsonFormatter().format(record))
    finally:
        request_id.reset(token_r)
        job_id.reset(token_j)
    assert entry["message"] == "lease x lost" and entry["level"] == "warning" and entry["logger"] == "worker"
    assert entry["request_id"] == "req-1" and entry["job_id"] == "job-9" and entry["time"].endswith("+00:00")


def test_only_sane_request_ids_are_kept() -> None:
    assert clean_request_id("abc-123_x.y") == "abc-123_x.y"
    for bad in (None, "", "has space", "x" * 65, "semi;colon"):
        assert len(clean_request_id(bad)) == 32


def test_the_api_echoes_the_request_id_and_stores_it_on_the_job(migrated_url: str, tmp_path: Path) -> None:
    with api_client(api_settings(tmp_path / "state", migrated_url)) as client:
        r = client.post("/v1/jobs", json=TRAIN_SPEC, headers={"X-Request-ID": "trace-42"})
        assert r.status_code == 201 and r.headers["X-Request-ID"] == "trace-42"
        fresh = client.get("/healthz")
        assert len(fresh.headers["X-Request-ID"]) == 32
    with session_scope(get_engine(migrated_url)) as session:
        assert session.scalar(select(Job.request_id).where(Job.id == r.json()["id"])) == "trace-42"
