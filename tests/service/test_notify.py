"""Job-end callbacks: signed, retried with back-off, sent to a real HTTP server on loopback."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from service.config import get_settings
from service.db import session_scope
from service.models import JobStatus
from service.notify import callback_secret, deliver, notify_job_end, sign
from service.states import create_job, request_cancel


class Receiver:
    """A loopback HTTP server that records POSTs and fails the first `fail_first` of them."""

    def __init__(self, fail_first: int = 0) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(500 if len(receiver.requests) <= receiver.fail_first else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(fail_first=1)
    yield r
    r.server.shutdown()


def verify(secret: bytes, headers: dict[str, str], body: bytes) -> bool:
    expected = "sha256=" + hmac.new(secret, headers["x-itrd-timestamp"].encode() + b"." + body,
                                    hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers["x-itrd-signature"])


def test_delivery_is_signed_and_retried_until_accepted(receiver: Receiver) -> None:
    assert deliver(receiver.url, {"id": "j1", "status": "succeeded"}, b"s3cret", delays=(0.05, 0.05))
    assert len(receiver.requests) == 2  # the first answer was a 500
    headers, body = receiver.requests[-1]
    assert verify(b"s3cret", headers, body) and not verify(b"other", headers, body)
    assert json.loads(body) == {"id": "j1", "status": "succeeded"} and headers["x-itrd-delivery-attempt"] == "2"


def test_delivery_gives_up_after_its_retries() -> None:
    assert not deliver("http://127.0.0.1:9/nothing-listens", {"id": "x"}, b"k", delays=(0.01, 0.01))


def test_signature_binds_the_timestamp() -> None:
    assert sign(b"k", "1", b"{}") != sign(b"k", "2", b"{}")


def test_embedded_secret_is_made_once_and_kept_private(tmp_path: Path) -> None:
    settings = get_settings()
    first = callback_secret(settings)
    assert first == callback_secret(settings) and len(first) == 64
    assert (settings.state_dir / "callback_secret").stat().st_mode & 0o077 == 0


def test_a_cancelled_jobs_callback_carries_the_job(engine: Engine, receiver: Receiver) -> None:
    receiver.fail_first = 0
    spec = {"kind": "train", "model": "resnet8", "callback_url": receiver.url}
    with session_scope(engine) as session:
        job = create_job(session, kind="train", spec=spec)
        job_id = job.id
    with session_scope(engine) as session:
        request_cancel(session, job_id)
    notify_job_end(job_id, engine, background=False)
    headers, body = receiver.requests[-1]
    payload = json.loads(body)
    assert payload["id"] == job_id and payload["status"] == JobStatus.cancelled
    assert verify(callback_secret(get_settings()), headers, body)


def test_no_callback_url_sends_nothing(engine: Engine, receiver: Receiver) -> None:
    with session_scope(engine) as session:
        job_id = create_job(session, kind="train", spec={"kind": "train", "model": "resnet8"}).id
    assert notify_job_end(job_id, engine) is None and receiver.requests == []


def test_cancelling_a_queued_job_over_the_api_calls_back(migrated_url: str, tmp_path: Path,
                                                         receiver: Receiver) -> None:
    from api_support import TRAIN_SPEC, api_client, api_settings

    receiver.fail_first = 0
    settings = api_settings(tmp_path / "state", migrated_url)
    with api_client(settings) as client:
        job = client.post("/v1/jobs", json={**TRAIN_SPEC, "callback_url": receiver.url}).json()
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
        deadline = time.monotonic() + 10
        while not receiver.requests and time.monotonic() < deadline:
            time.sleep(0.05)
    headers, body = receiver.requests[-1]
    assert json.loads(body)["id"] == job["id"] and json.loads(body)["status"] == "cancelled"
    assert verify(callback_secret(settings), headers, body)
