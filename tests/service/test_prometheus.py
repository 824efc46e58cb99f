"""GET /metrics: Prometheus' text format with job gauges from the records and this process's HTTP metrics."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from api_support import OWNER, api_client, api_settings, sqlite_database
from fastapi.testclient import TestClient

from service.config import Settings
from service.db import get_engine, session_scope
from service.models import Job, JobStatus, new_id, utcnow

SAMPLE = re.compile(r'^([a-z_:][a-z0-9_:]*)(?:\{(.*)\})? (\S+)$')


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings on a fresh SQLite database."""
    return api_settings(tmp_path / "state", sqlite_database(tmp_path))


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """A client of the app with a key."""
    with api_client(settings) as c:
        yield c


def parse(text: str) -> dict[tuple[str, str], float]:
    """Samples by (name, labels); also checks every sample's family declared its TYPE first."""
    samples, typed = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("#") or not line:
            continue
        match = SAMPLE.match(line)
        assert match, line
        name, labels, value = match.groups()
        assert re.sub(r"_(bucket|sum|count)$", "", name) in typed or name in typed, line
        samples[(name, labels or "")] = float(value)
    return samples


def add(settings: Settings, status: JobStatus, queue: str = "cpu", lease: float | None = None,
        images: float | None = None) -> None:
    """A job row; `lease` seconds from now (negative: expired), `images` its latest images/s."""
    now = utcnow()
    values: dict[str, Any] = {"id": new_id(), "kind": "train", "spec": {}, "status": status, "owner": OWNER,
                              "queue": queue, "created_at": now}
    if lease is not None:
        values.update(lease_owner=f"worker-{new_id()[-6:]}", lease_expires_at=now + timedelta(seconds=lease))
    if images is not None:
        values["latest_metrics"] = {"epoch": 1, "images_per_second": images}
    with session_scope(get_engine(settings.database_url)) as session:
        session.add(Job(**values))


def test_job_gauges(client: TestClient, settings: Settings) -> None:
    add(settings, JobStatus.queued)
    add(settings, JobStatus.queued)
    add(settings, JobStatus.queued, queue="cuda")
    add(settings, JobStatus.running, lease=60, images=100.0)
    add(settings, JobStatus.cancelling, lease=60, images=50.5)
    add(settings, JobStatus.running, lease=-5, images=1000.0)  # its worker is gone
    add(settings, JobStatus.succeeded, images=7.0)
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = parse(response.text)
    assert samples[("itrd_jobs", 'status="queued"')] == 3
    assert samples[("itrd_jobs", 'status="running"')] == 2
    assert samples[("itrd_jobs", 'status="cancelling"')] == 1
    assert samples[("itrd_jobs", 'status="succeeded"')] == 1
    assert samples[("itrd_jobs", 'status="failed"')] == 0
    assert samples[("itrd_queue_depth", 'queue="cpu"')] == 2
    assert samples[("itrd_queue_depth", 'queue="cuda"')] == 1
    assert samples[("itrd_live_workers", "")] == 2
    assert samples[("itrd_training_images_per_second", "")] == 150.5


def test_http_requests_are_counted_by_route_template(client: TestClient) -> None:
    for _ in range(3):
        assert client.get("/v1/jobs/" + new_id()).status_code == 404
    assert client.get("/no/such/path").status_code == 404
    samples = parse(client.get("/metrics").text)
    labels = 'method="GET",route="/v1/jobs/{job_id}",status="404"'
    assert samples[("itrd_http_requests_total", labels)] == 3
    assert samples[("itrd_http_request_duration_seconds_count", labels)] == 3
    assert samples[("itrd_http_request_duration_seconds_bucket", labels + ',le="+Inf"')] == 3
    assert samples[("itrd_http_request_duration_seconds_sum", labels)] > 0
    buckets = [v for (name, lab), v in samples.items()
               if name == "itrd_http_request_duration_seconds_bucket" and lab.startswith(labels)]
    assert buckets == sorted(buckets)  # cumulative
    assert samples[("itrd_http_requests_total", 'method="GET",route="unmatched",status="404"')] == 1
    assert not any("no/such" in lab for _, lab in samples)
