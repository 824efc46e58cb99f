"""itrd.client against a real uvicorn server: typed results, problem errors, waiting, events, downloads."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import TRAIN_SPEC
from live_server import LiveServer, running_server

from itrd.client import (
    ApiError,
    ChecksumMismatch,
    Client,
    JobCancelled,
    JobFailed,
    ServiceUnreachable,
    parse_sse,
)
from service.models import JobStatus, utcnow
from service.schemas import ArtifactPublic, JobPublic

PAYLOAD = os.urandom(300_000)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One API process for the module (starting one imports torch: seconds on a busy machine)."""
    with running_server(tmp_path_factory.mktemp("client")) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[Client]:
    """A client with the owner's API key."""
    with Client(server.url, api_key=server.api_key, timeout=10) as c:
        yield c


def later(delay: float, action: Any) -> threading.Thread:
    """Run `action` after `delay` seconds on a thread (a worker's writes, arriving while we wait)."""
    def run() -> None:
        time.sleep(delay)
        action()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_submit_get_list_and_cancel_return_typed_jobs(client: Client) -> None:
    ids = [client.submit({**TRAIN_SPEC, "seed": seed}).id for seed in range(3)]
    job = client.get(ids[0])
    assert isinstance(job, JobPublic) and job.status == JobStatus.queued and job.spec["seed"] == 0
    listed = [j.id for j in client.list(kind="train", page_size=2)]  # two pages
    assert listed[:3] == ids[::-1]
    assert [j.id for j in client.list(kind="train", limit=2, page_size=1)] == ids[:0:-1]
    cancelled = client.cancel(ids[1])
    assert cancelled.status == JobStatus.cancelled
    assert ids[1] not in [j.id for j in client.list(status="queued")]
    assert ids[1] in [j.id for j in client.list(status=["cancelled", "failed"])]
    with pytest.raises(ApiError) as ended:
        client.cancel(ids[1])
    assert ended.value.status == 409 and ended.value.problem["type"] == "urn:itrd:problem:job-already-ended"


def test_errors_carry_the_problem_details(client: Client, server: LiveServer) -> None:
    with pytest.raises(ApiError) as invalid:
        client.submit({**TRAIN_SPEC, "modle": "resnet8"})
    assert invalid.value.status == 422
    assert any(e["loc"][-1] == "modle" for e in invalid.value.errors)
    with pytest.raises(ApiError) as missing:
        client.get("0" * 32)
    assert missing.value.status == 404 and missing.value.problem["type"] == "urn:itrd:problem:job-not-found"
    for key in (None, "itrd_000000000000_wrong"):
        with Client(server.url, api_key=key) as anonymous, pytest.raises(ApiError) as refused:
            anonymous.get("0" * 32)
        assert refused.value.status == 401
    with Client(f"http://127.0.0.1:{_closed_port()}") as nowhere, pytest.raises(ServiceUnreachable):
        nowhere.get("x")


def _closed_port() -> int:
    from api_support import free_port

    return free_port()


def test_jobs_of_another_owner_are_invisible(client: Client, server: LiveServer) -> None:
    other = server.add_job(JobStatus.queued, owner="someone-else")
    with pytest.raises(ApiError) as hidden:
        client.get(other)
    assert hidden.value.status == 404
    assert other not in [j.id for j in client.list()]


def test_idempotency_key_returns_the_first_job(client: Client) -> None:
    first = client.submit(TRAIN_SPEC, idempotency_key="client-test-1")
    again = client.submit(TRAIN_SPEC, idempotency_key="client-test-1")
    assert again.id == first.id


def test_wait_returns_the_succeeded_job(client: Client, server: LiveServer) -> None:
    job_id = server.add_job()

    def finish() -> None:
        server.add_metrics(job_id, 1, loss_ce=1.0, test_top1=50.0)
        server.update_job(job_id, status=JobStatus.succeeded, epoch=3, fraction=1.0, finished_at=utcnow(),
                          lease_owner=None, lease_expires_at=None)

    later(0.5, finish)
    done = client.wait(job_id, progress=True, poll_seconds=0.2, timeout=30)
    assert done.status == JobStatus.succeeded and done.latest_metrics == {"epoch": 1, "loss_ce": 1.0, "test_top1": 50.0}


def test_wait_raises_with_the_failure_reason(client: Client, server: LiveServer) -> None:
    failed = server.add_job(JobStatus.failed, failure_reason="loss is NaN at epoch 2, step 7 (term corr)")
    with pytest.raises(JobFailed) as caught:
        client.wait(failed, progress=False)
    assert caught.value.reason == "loss is NaN at epoch 2, step 7 (term corr)"
    assert caught.value.job.id == failed
    cancelled = server.add_job(JobStatus.cancelled, failure_reason="cancelled through the API")
    with pytest.raises(JobCancelled):
        client.wait(cancelled, progress=False)
    running = server.add_job()
    with pytest.raises(TimeoutError):
        client.wait(running, progress=False, poll_seconds=0.1, timeout=0.3)


def test_metrics_and_artifacts_are_typed(client: Client, server: LiveServer) -> None:
    job_id = server.add_job()
    for epoch in (1, 2):
        server.add_metrics(job_id, epoch, loss_ce=2.0 / epoch, test_top1=40.0 + epoch)
    digest = server.add_artifact(job_id, "best.pt", PAYLOAD)
    assert [m["epoch"] for m in client.metrics(job_id)] == [1, 2]
    assert client.metrics(job_id)[1]["test_top1"] == 42.0
    (artifact,) = client.artifacts(job_id)
    assert isinstance(artifact, ArtifactPublic)
    assert (artifact.name, artifact.size, artifact.sha256) == ("best.pt", len(PAYLOAD), digest)


class CuttingTransport(httpx.BaseTransport):
    """Passes requests through, but breaks the first artifact download after `cut` bytes."""

    def __init__(self, cut: int) -> None:
        self.inner, self.cut, self.cuts_left = httpx.HTTPTransport(), cut, 1
        self.ranges: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Forward the request; record the Range of artifact downloads, and cut the first one short."""
        response = self.inner.handle_request(request)
        if "/artifacts/" not in request.url.path:
            return response
        self.ranges.append(request.headers.get("range"))
        if not self.cuts_left:
            return response
        self.cuts_left -= 1
        cut, body = self.cut, response.stream

        class Broken(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                sent = 0
                for chunk in body:  # type: ignore[union-attr]
                    if sent + len(chunk) >= cut:
                        yield chunk[: cut - sent]
                        raise httpx.ReadError("connection reset by the test")
                    sent += len(chunk)
                    yield chunk

            def close(self) -> None:
                body.close()  # type: ignore[union-attr]

        return httpx.Response(response.status_code, headers=response.headers, stream=Broken(),
                              request=request)


def test_a_cut_download_resumes_with_range_and_verifies(server: LiveServer, tmp_path: Path) -> None:
    job_id = server.add_job(JobStatus.succeeded)
    digest = server.add_artifact(job_id, "student.safetensors", PAYLOAD)
    transport = CuttingTransport(cut=100_000)
    target = tmp_path / "out" / "student.safetensors"
    with Client(server.url, api_key=server.api_key, transport=transport) as c:
        assert c.download(job_id, "student.safetensors", target) == target
    assert target.read_bytes() == PAYLOAD
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest
    assert not target.with_name("student.safetensors.part").exists()
    assert transport.ranges == [None, "bytes=100000-"]


def test_a_leftover_part_file_is_resumed(client: Client, server: LiveServer, tmp_path: Path) -> None:
    job_id = server.add_job(JobStatus.succeeded)
    server.add_artifact(job_id, "best.pt", PAYLOAD)
    target = tmp_path / "best.pt"
    target.with_name("best.pt.part").write_bytes(PAYLOAD[:12345])
    client.download(job_id, "best.pt", target)
    assert target.read_bytes() == PAYLOAD
    server.add_artifact(job_id, "empty.log", b"")
    assert client.download(job_id, "empty.log", tmp_path / "empty.log").read_bytes() == b""


def test_a_corrupt_part_file_fails_the_checksum_and_is_removed(client: Client, server: LiveServer,
                                                                tmp_path: Path) -> None:
    job_id = server.add_job(JobStatus.succeeded)
    server.add_artifact(job_id, "best.pt", PAYLOAD)
    target = tmp_path / "best.pt"
    part = target.with_name("best.pt.part")
    part.write_bytes(b"\0" * 1000)  # not the file's first kilobyte
    with pytest.raises(ChecksumMismatch):
        client.download(job_id, "best.pt", target)
    assert not part.exists() and not target.exists()
    client.download(job_id, "best.pt", target)  # the next try starts clean
    assert target.read_bytes() == PAYLOAD
    with pytest.raises(ApiError) as missing:
        client.download(job_id, "nope.pt", tmp_path / "nope.pt")
    assert missing.value.status == 404


def test_upload_teacher(client: Client, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from itrd.models import create_model

    weights = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in create_model("resnet8", 10).state_dict().items()}, str(weights))
    teacher = client.upload_teacher(weights, "resnet8", 10)
    assert teacher.architecture == "resnet8" and teacher.num_classes == 10 and len(teacher.sha256) == 64
    with pytest.raises(ApiError) as wrong:
        client.upload_teacher(weights, "resnet20", 10)
    assert wrong.value.status == 422


def test_parse_sse_reads_events_ids_and_multiline_data() -> None:
    lines = ["retry: 2000", "", ": keep-alive", "", "id: 3", "event: metrics", 'data: {"epoch":', "data: 3}", "",
             "event: state", "data: plain text", ""]
    events = list(parse_sse(iter(lines)))
    assert [(e.event, e.data, e.id) for e in events] == [("metrics", {"epoch": 3}, "3"),
                                                          ("state", "plain text", None)]


def test_events_stream_metrics_progress_and_states_until_the_end(client: Client, server: LiveServer) -> None:
    job_id = server.add_job(epoch=2, step=3, fraction=0.4)
    server.add_metrics(job_id, 1, loss_ce=2.0, loss_corr=0.5, loss_mi=0.1, test_top1=30.0)
    server.add_metrics(job_id, 2, loss_ce=1.5, loss_corr=0.4, loss_mi=0.09, test_top1=45.0)

    def worker() -> None:
        server.update_job(job_id, epoch=3, step=10, fraction=1.0)
        server.add_metrics(job_id, 3, loss_ce=1.0, loss_corr=0.3, loss_mi=0.08, test_top1=60.0)
        server.update_job(job_id, status=JobStatus.succeeded, finished_at=utcnow(), lease_owner=None,
                          lease_expires_at=None)

    later(1.5, worker)
    start = time.monotonic()
    events = list(client.events(job_id))
    assert time.monotonic() - start < 20
    metrics = [e for e in events if e.event == "metrics"]
    assert [(e.id, e.data["epoch"], e.data["test_top1"]) for e in metrics] == [("1", 1, 30.0), ("2", 2, 45.0),
                                                                               ("3", 3, 60.0)]
    states = [e.data["status"] for e in events if e.event == "state"]
    assert states == ["running", "succeeded"]
    assert events[-1].event == "state"  # the stream ends with the final state, after the last metrics
    fractions = [e.data["fraction"] for e in events if e.event == "progress"]
    assert fractions[0] == 0.4 and fractions[-1] == 1.0
    # Reconnecting with Last-Event-ID: only the epochs after it, then the (final) state.
    resumed = list(client.events(job_id, last_event_id="2"))
    assert [e.data["epoch"] for e in resumed if e.event == "metrics"] == [3]
    assert resumed[-1].event == "state" and resumed[-1].data["status"] == "succeeded"


def test_an_epoch_recorded_again_after_a_resume_is_streamed_again(client: Client, server: LiveServer) -> None:
    job_id = server.add_job(epoch=2, step=0, fraction=0.5)
    server.add_metrics(job_id, 1, test_top1=30.0)
    server.add_metrics(job_id, 2, test_top1=45.0)

    def resumed_worker() -> None:
        # The job resumed from epoch 1's checkpoint: epoch 2 is trained again and replaces its record.
        server.add_metrics(job_id, 2, test_top1=47.0)
        time.sleep(1.0)
        server.add_metrics(job_id, 3, test_top1=60.0)
        server.update_job(job_id, status=JobStatus.succeeded, finished_at=utcnow(), lease_owner=None,
                          lease_expires_at=None)

    later(1.5, resumed_worker)
    events = list(client.events(job_id))
    metrics = [(e.data["epoch"], e.data["test_top1"]) for e in events if e.event == "metrics"]
    assert metrics == [(1, 30.0), (2, 45.0), (2, 47.0), (3, 60.0)]
    latest = {epoch: top1 for epoch, top1 in metrics}  # what a client keeps: the last event per epoch
    assert latest == {1: 30.0, 2: 47.0, 3: 60.0}


def test_events_of_a_missing_job_are_a_404_problem(client: Client) -> None:
    with pytest.raises(ApiError) as missing:
        list(client.events("0" * 32))
    assert missing.value.status == 404
