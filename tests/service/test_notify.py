"""Job-end callbacks: owed from the transaction that ends the job, signed, retried with back-off,
sent to a real HTTP server on loopback, never lost with the process that ended the job."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hook_support import Receiver, verify
from sqlalchemy import Engine, select

from service.config import get_settings
from service.db import session_scope
from service.dispatch import reap_once
from service.models import CallbackDelivery, Job, JobStatus, utcnow
from service.notify import MAX_ATTEMPTS, callback_secret, deliver_due, sign
from service.states import create_job, request_cancel, transition


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=1)
    yield r
    r.server.shutdown()


TRAIN = {"kind": "train", "model": "resnet8"}


def ended_job(engine: Engine, url: str | None) -> str:
    """A queued job with (or without) a callback URL, cancelled: ended, its end committed."""
    spec = {**TRAIN, "callback_url": url} if url else TRAIN
    with session_scope(engine) as session:
        job_id = create_job(session, kind="train", spec=spec).id
    with session_scope(engine) as session:
        request_cancel(session, job_id)
    return job_id


def deliveries(engine: Engine) -> list[CallbackDelivery]:
    with session_scope(engine) as session:
        rows = list(session.scalars(select(CallbackDelivery).order_by(CallbackDelivery.id)))
        session.expunge_all()
    return rows


def wait_for(predicate: Any, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_senders_making_the_secret_at_once_all_get_the_same_one(tmp_path: Path) -> None:
    settings = get_settings().model_copy(update={"state_dir": tmp_path / "fresh", "secret_key": None})
    barrier = threading.Barrier(8)
    found: list[bytes] = []

    def make() -> None:
        barrier.wait()
        found.append(callback_secret(settings))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(found) == 8 and len(set(found)) == 1 and len(found[0]) == 64
    assert [p.name for p in (tmp_path / "fresh").iterdir()] == ["callback_secret"]  # no drafts left


def test_ending_a_job_owes_its_callback_in_the_same_transaction(engine: Engine) -> None:
    ended_job(engine, None)
    assert deliveries(engine) == []  # no URL, nothing owed
    job_id = ended_job(engine, "http://127.0.0.1:9/hook")
    [row] = deliveries(engine)
    assert (row.job_id, row.url, row.state, row.attempts) == (job_id, "http://127.0.0.1:9/hook", "pending", 0)


def test_due_callback_is_signed_delivered_once_and_marked(engine: Engine, receiver: Receiver) -> None:
    receiver.fail_first = 0
    job_id = ended_job(engine, receiver.url)
    assert deliver_due(engine) == [job_id]
    assert deliver_due(engine) == []  # delivered rows are never sent again
    [(headers, body)] = receiver.requests
    payload = json.loads(body)
    assert payload["id"] == job_id and payload["status"] == JobStatus.cancelled
    assert verify(callback_secret(get_settings()), headers, body) and not verify(b"other", headers, body)
    assert headers["x-itrd-delivery"].startswith(job_id) and headers["x-itrd-delivery-attempt"] == "1"
    [row] = deliveries(engine)
    assert row.state == "delivered" and row.delivered_at is not None and row.last_error is None


def test_failed_attempt_is_retried_after_its_back_off_with_the_same_delivery_id(engine: Engine,
                                                                             receiver: Receiver) -> None:
    job_id = ended_job(engine, receiver.url)  # the receiver answers 500 once
    assert deliver_due(engine) == []
    [row] = deliveries(engine)
    assert row.state == "pending" and row.attempts == 1 and "HTTP 500" in (row.last_error or "")
    assert deliver_due(engine) == []  # not due yet: backing off
    assert deliver_due(engine, now=row.next_attempt_at + timedelta(seconds=1)) == [job_id]
    first, second = (h for h, _ in receiver.requests)
    assert first["x-itrd-delivery"] == second["x-itrd-delivery"]  # receivers dedupe on it
    assert second["x-itrd-delivery-attempt"] == "2"


def test_a_receiver_that_never_accepts_is_given_up_on(engine: Engine, receiver: Receiver) -> None:
    receiver.fail_first = -1
    ended_job(engine, receiver.url)
    now = utcnow()
    for _ in range(MAX_ATTEMPTS + 2):
        deliver_due(engine, now=now)
        now += timedelta(hours=2)
    [row] = deliveries(engine)
    assert row.state == "failed" and row.attempts == MAX_ATTEMPTS and len(receiver.requests) == MAX_ATTEMPTS


def test_two_senders_never_send_one_callback_twice(engine: Engine, receiver: Receiver) -> None:
    receiver.fail_first = 0
    ids = {ended_job(engine, receiver.url) for _ in range(6)}
    results: list[list[str]] = []
    threads = [threading.Thread(target=lambda: results.append(deliver_due(engine))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(j for r in results for j in r) == sorted(ids)
    assert sorted(json.loads(body)["id"] for _, body in receiver.requests) == sorted(ids)


def test_students_failed_by_their_teacher_are_called_back_too(engine: Engine, receiver: Receiver) -> None:
    receiver.fail_first = 0
    with session_scope(engine) as session:
        teacher = create_job(session, kind="train", spec={**TRAIN, "callback_url": receiver.url})
        student = create_job(session, kind="distill", teacher_job_id=teacher.id,
                             spec={"kind": "distill", "model": "resnet8", "callback_url": receiver.url})
        teacher_id, student_id = teacher.id, student.id
        assert student.status == JobStatus.waiting
    with session_scope(engine) as session:
        transition(session, session.get(Job, teacher_id), JobStatus.failed, "broke")
    assert sorted(deliver_due(engine)) == sorted([teacher_id, student_id])
    bodies = {json.loads(body)["id"]: json.loads(body) for _, body in receiver.requests}
    assert bodies[student_id]["status"] == "failed" and teacher_id in bodies[student_id]["failure_reason"]


def test_a_callback_left_by_a_dead_process_is_sent_by_the_reaper(engine: Engine, receiver: Receiver,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # The job's end committed, then its process died before sending: nothing but the row remains.
    receiver.fail_first = 0
    job_id = ended_job(engine, receiver.url)
    assert receiver.requests == []
    monkeypatch.setattr("service.dispatch.dispatch", lambda *a, **k: [])  # no broker needed for this sweep
    reap_once(engine)
    wait_for(lambda: receiver.requests)
    assert json.loads(receiver.requests[0][1])["id"] == job_id
    wait_for(lambda: deliveries(engine)[0].state == "delivered")


def test_signature_binds_the_timestamp() -> None:
    assert sign(b"k", "1", b"{}") != sign(b"k", "2", b"{}")


def test_embedded_secret_is_made_once_and_kept_private(tmp_path: Path) -> None:
    settings = get_settings()
    first = callback_secret(settings)
    assert first == callback_secret(settings) and len(first) == 64
    assert (settings.state_dir / "callback_secret").stat().st_mode & 0o077 == 0


def test_cancelling_a_queued_job_over_the_api_calls_back(migrated_url: str, tmp_path: Path,
                                                         receiver: Receiver) -> None:
    from api_support import TRAIN_SPEC, api_client, api_settings

    # The API's own reaper sends the retry, as in a deployment with no worker running.
    settings = api_settings(tmp_path / "state", migrated_url, reaper_in_api=True, reap_seconds=0.5)
    with api_client(settings) as client:
        job = client.post("/v1/jobs", json={**TRAIN_SPEC, "callback_url": receiver.url}).json()
        assert job["callback"] is None  # nothing owed while the job lives
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
        wait_for(lambda: receiver.requests)
        # The first attempt got a 500: the job view says so, and when it is tried again.
        wait_for(lambda: (client.get(f"/v1/jobs/{job['id']}").json()["callback"] or {}).get("attempts") == 1)
        pending = client.get(f"/v1/jobs/{job['id']}").json()["callback"]
        assert pending["state"] == "pending" and "500" in pending["last_error"] and pending["next_attempt_at"]
        wait_for(lambda: client.get(f"/v1/jobs/{job['id']}").json()["callback"]["state"] == "delivered")
        delivered = client.get(f"/v1/jobs/{job['id']}").json()["callback"]
        assert delivered["attempts"] == 2 and delivered["last_error"] is None and delivered["delivered_at"]
        assert client.get("/v1/jobs").json()["items"][0]["callback"]["state"] == "delivered"
    headers, body = receiver.requests[-1]
    assert json.loads(body)["id"] == job["id"] and json.loads(body)["status"] == "cancelled"
    assert "callback" not in json.loads(body)
    assert verify(callback_secret(settings), headers, body)
