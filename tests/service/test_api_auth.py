"""Who may do what: API keys (hashed, revocable, from the CLI), owners kept apart, submissions rate-limited."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from api_support import (
    OWNER,
    TRAIN_SPEC,
    api_client,
    api_settings,
    assert_problem,
    bearer,
    empty_tables,
    make_key,
)
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from service.api.app import create_app
from service.config import Settings, get_settings
from service.db import get_engine, migrate_to_head
from service.keys import authenticate, create_key, hash_key, revoke_key
from service.keys_cli import keys
from service.models import ApiKey, Job, JobStatus, TeacherUpload, new_id, record_artifact, utcnow
from service.ratelimit import RedisWindowLimiter, SlidingWindowLimiter
from service.storage import store_from_settings

PROTECTED = [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", f"/v1/jobs/{'0' * 32}"),
             ("POST", f"/v1/jobs/{'0' * 32}/cancel"), ("GET", f"/v1/jobs/{'0' * 32}/artifacts"),
             ("GET", "/v1/teachers"), ("POST", "/v1/teachers")]


@pytest.fixture
def settings(pg_url: str, tmp_path: Path) -> Iterator[Settings]:
    """Embedded settings on PostgreSQL, at most 3 submissions a minute per key."""
    yield api_settings(tmp_path / "state", pg_url, submit_rate_per_minute=3)
    empty_tables(pg_url)


def test_no_key_or_a_bad_key_is_401_and_public_paths_stay_open(settings: Settings) -> None:
    with api_client(settings, owner=None) as anonymous:
        for method, path in PROTECTED:
            body = assert_problem(anonymous.request(method, path), 401, "unauthorized")
            assert "Authorization: Bearer" in body["detail"]
        answer = anonymous.get("/v1/jobs")
        assert answer.headers["www-authenticate"].startswith("Bearer")
        for bad in ({"Authorization": "Bearer nonsense"}, {"Authorization": "Basic dXNlcjpwYXNz"},
                    bearer("itrd_0123456789ab_not-the-secret"), bearer(make_key(settings.database_url) + "x")):
            answer = anonymous.get("/v1/jobs", headers=bad)
            assert answer.status_code == 401, bad
            assert answer.headers["www-authenticate"].startswith("Bearer")
        for path in ("/healthz", "/readyz", "/v1/models", "/v1/methods", "/v1/presets", "/docs", "/openapi.json"):
            assert anonymous.get(path).status_code == 200, path
        schema = anonymous.get("/openapi.json").json()
        assert any(s.get("scheme", "").lower() == "bearer" for s in schema["components"]["securitySchemes"].values())
        jobs = schema["paths"]["/v1/jobs"]
        assert "401" in jobs["get"]["responses"] and {"401", "429"} <= set(jobs["post"]["responses"])
        assert "401" not in schema["paths"]["/v1/models"]["get"]["responses"]


def test_a_revoked_key_is_401_from_then_on(settings: Settings, client: TestClient, db: Session) -> None:
    key = make_key(settings.database_url, OWNER)
    assert client.get("/v1/jobs", headers=bearer(key)).status_code == 200
    row = authenticate(db, key)
    assert row is not None and row.owner == OWNER
    revoke_key(db, row.id)
    body = assert_problem(client.get("/v1/jobs", headers=bearer(key)), 401, "unauthorized")
    assert "revoked" in body["detail"]
    assert 'error="invalid_token"' in client.get("/v1/jobs", headers=bearer(key)).headers["www-authenticate"]
    assert client.get("/v1/jobs").status_code == 200  # the owner's other key still works


def test_only_the_hash_of_a_key_is_stored(db: Session) -> None:
    row, key = create_key(db, "alice", name="laptop")
    assert key.startswith(f"itrd_{row.prefix}_") and len(key) > 40
    assert row.key_hash == hashlib.sha256(key.encode()).hexdigest() == hash_key(key)
    secret = key.rsplit("_", 1)[1]
    for values in db.execute(text("SELECT * FROM api_keys")):
        assert not any(secret in str(v) for v in values)
    other_row, other = create_key(db, "alice")
    assert other != key and other_row.prefix != row.prefix
    assert authenticate(db, key) is row and authenticate(db, other) is other_row
    with pytest.raises(ValueError, match="owner"):
        create_key(db, "   ")


def _foreign_records(db: Session, settings: Settings) -> dict[str, str]:
    """A succeeded job of 'mallory' with an artifact, and an upload of hers."""
    job = Job(id=new_id(), kind="train", spec={"model": "resnet8", "dataset": {"name": "digits"}},
              status=JobStatus.succeeded, created_at=utcnow(), owner="mallory")
    upload = TeacherUpload(id=new_id(), architecture="resnet8", num_classes=10, size=1, sha256="0" * 64,
                           storage_key="k", owner="mallory")
    db.add_all([job, upload])
    db.commit()
    source = settings.state_dir / "last.pt"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(b"weights")
    size, digest = store_from_settings(settings).put_file(job.id, "last.pt", source)
    record_artifact(db, job.id, "last.pt", size, digest)
    db.commit()
    return {"job": job.id, "upload": upload.id}


def test_another_owners_records_are_404(client: TestClient, db: Session, settings: Settings) -> None:
    theirs = _foreign_records(db, settings)
    mallory = bearer(make_key(settings.database_url, "mallory"))
    job, upload = theirs["job"], theirs["upload"]
    # Mallory reaches her own records...
    assert client.get(f"/v1/jobs/{job}/artifacts/last.pt", headers=mallory).content == b"weights"
    assert client.get(f"/v1/teachers/{upload}", headers=mallory).status_code == 200
    # ...and to anyone else they do not exist.
    for path in (f"/v1/jobs/{job}", f"/v1/jobs/{job}/metrics", f"/v1/jobs/{job}/artifacts",
                 f"/v1/jobs/{job}/artifacts/last.pt"):
        body = assert_problem(client.get(path), 404, "job-not-found")
        assert "mallory" not in body["detail"]
    assert_problem(client.post(f"/v1/jobs/{job}/cancel"), 404, "job-not-found")
    assert_problem(client.get(f"/v1/teachers/{upload}"), 404, "teacher-not-found")
    assert client.get("/v1/jobs").json()["total"] == 0 and client.get("/v1/teachers").json()["total"] == 0
    distill: dict[str, Any] = {"model": "resnet8", "teacher": {"architecture": "resnet8"}}
    for field in ("job", "upload"):
        spec = {**distill, "teacher": {**distill["teacher"], field: theirs[field]}}
        assert "does not exist" in assert_problem(client.post("/v1/jobs", json=spec), 422)["detail"]

    mine = client.post("/v1/jobs", json=TRAIN_SPEC).json()
    assert db.scalar(select(Job.owner).where(Job.id == mine["id"])) == OWNER
    assert [j["id"] for j in client.get("/v1/jobs", headers=mallory).json()["items"]] == [job]
    assert_problem(client.post(f"/v1/jobs/{mine['id']}/cancel", headers=mallory), 404, "job-not-found")
    assert client.get(f"/v1/jobs/{mine['id']}").json()["status"] == "queued"


def test_submissions_are_rate_limited_per_key(client: TestClient, settings: Settings) -> None:
    for _ in range(3):
        assert client.post("/v1/jobs", json=TRAIN_SPEC).status_code == 201
    refused = client.post("/v1/jobs", json=TRAIN_SPEC)
    body = assert_problem(refused, 429, "rate-limited")
    assert "ITRD_SUBMIT_RATE_PER_MINUTE" in body["detail"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert_problem(client.post("/v1/teachers", data={"architecture": "resnet8", "num_classes": "10"},
                               files={"file": ("t.pt", b"x")}), 429, "rate-limited")
    assert client.get("/v1/jobs").json()["total"] == 3  # reading is not limited, and nothing was added
    other = bearer(make_key(settings.database_url, OWNER))  # the limit is per key
    assert client.post("/v1/jobs", json=TRAIN_SPEC, headers=other).status_code == 201


def test_the_window_slides() -> None:
    now = [1000.0]
    limiter = SlidingWindowLimiter(2, window=60, clock=lambda: now[0])
    assert limiter.hit("k") is None
    now[0] += 30
    assert limiter.hit("k") is None
    assert limiter.hit("k") == 30 and limiter.hit("other") is None
    now[0] += 30  # the first hit leaves the window
    assert limiter.hit("k") is None and limiter.hit("k") == 30


def test_api_replicas_share_one_limit_through_redis(settings: Settings) -> None:
    # Two app instances are two API replicas; with a Redis broker they count in one window.
    broker = f"redis://127.0.0.1:6379/{secrets.randbelow(14) + 1}"
    shared = settings.model_copy(update={"broker_url": broker})
    headers = bearer(make_key(settings.database_url, OWNER))
    try:
        with TestClient(create_app(shared), headers=headers) as a, TestClient(create_app(shared), headers=headers) as b:
            assert [c.post("/v1/jobs", json=TRAIN_SPEC).status_code for c in (a, b, a)] == [201, 201, 201]
            assert_problem(b.post("/v1/jobs", json=TRAIN_SPEC), 429, "rate-limited")
            assert_problem(a.post("/v1/jobs", json=TRAIN_SPEC), 429, "rate-limited")
            assert a.get("/v1/jobs").json()["total"] == 3
    finally:
        redis.Redis.from_url(broker).flushdb()


def test_the_redis_window_slides_on_redis_time() -> None:
    limiter = RedisWindowLimiter("redis://127.0.0.1:6379/15", 2, window=1.0, prefix=f"test:{secrets.token_hex(4)}:")
    assert limiter.hit("k") is None and limiter.hit("k") is None
    assert limiter.hit("k") == 1 and limiter.hit("other") is None
    time.sleep(1.1)  # both hits leave the window
    assert limiter.hit("k") is None


def test_with_redis_unreachable_the_process_counts_alone() -> None:
    limiter = RedisWindowLimiter("redis://127.0.0.1:1/0", 2, timeout=0.2)
    assert limiter.hit("k") is None and limiter.hit("k") is None  # submits go on: they need the database
    assert limiter.hit("k") is not None  # and are still limited, per process


def test_keys_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    monkeypatch.setenv("ITRD_DATABASE_URL", url)
    get_settings.cache_clear()
    runner = CliRunner()
    unmigrated = runner.invoke(keys, ["create", "alice"])
    assert unmigrated.exit_code != 0 and "itrd migrate" in unmigrated.output
    migrate_to_head(url)

    made = runner.invoke(keys, ["create", "alice", "--name", "ci"])
    assert made.exit_code == 0, made.output
    key = made.stdout.strip().splitlines()[-1]
    with Session(get_engine(url)) as session:
        row = authenticate(session, key)
        assert row is not None and (row.owner, row.name) == ("alice", "ci")
        assert session.scalar(select(ApiKey.key_hash)) == hash_key(key)
    assert runner.invoke(keys, ["create", "bob"]).exit_code == 0
    listed = runner.invoke(keys, ["list", "alice"]).stdout
    assert row.id in listed and "active" in listed and "bob" not in listed and key not in listed
    assert "bob" in runner.invoke(keys, ["list"]).stdout

    revoked = runner.invoke(keys, ["revoke", row.id])
    assert revoked.exit_code == 0 and "revoked" in revoked.stdout
    with Session(get_engine(url)) as session:
        assert authenticate(session, key) is None
    assert "revoked" in runner.invoke(keys, ["list", "alice"]).stdout
    missing = runner.invoke(keys, ["revoke", "nope"])
    assert missing.exit_code != 0 and "does not exist" in missing.output
