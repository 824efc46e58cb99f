"""The jobs API over a real PostgreSQL (and SQLite for the happy path), the embedded broker in tmp."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from api_support import (
    OWNER,
    TRAIN_SPEC,
    api_client,
    api_settings,
    assert_problem,
    bearer,
    broker_messages,
    empty_tables,
    error_locs,
    sqlite_database,
)
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.config import Settings
from service.models import Job, JobStatus, TeacherUpload, new_id, record_metrics, utcnow


@pytest.fixture
def settings(pg_url: str, tmp_path: Path) -> Iterator[Settings]:
    """Embedded-mode settings on the PostgreSQL database; tables emptied afterwards."""
    yield api_settings(tmp_path / "state", pg_url)
    empty_tables(pg_url)


def add_job(db: Session, status: JobStatus = JobStatus.queued, **fields: Any) -> Job:
    """A committed job row in any status, bypassing the API."""
    now = utcnow()
    spec = {"model": "resnet8", "dataset": {"name": "digits"}}
    values: dict[str, Any] = {"id": new_id(), "kind": "train", "spec": spec, "status": status, "created_at": now,
                              "queued_at": now, "queue": "cpu", "owner": OWNER}
    job = Job(**{**values, **fields})
    db.add(job)
    db.commit()
    return job


def add_upload(db: Session, architecture: str = "resnet8", num_classes: int = 10) -> str:
    """A teacher_uploads row (its weights are not needed to submit a job)."""
    row = TeacherUpload(id=new_id(), architecture=architecture, num_classes=num_classes, size=1, sha256="0" * 64,
                        storage_key="k", owner=OWNER)
    db.add(row)
    db.commit()
    return row.id


def distill(teacher: dict[str, Any], model: str = "resnet8", **extra: Any) -> dict[str, Any]:
    """A distill spec body on digits."""
    return {"model": model, "teacher": {"architecture": "resnet8", **teacher}, **extra}


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_submit_then_get_on_both_backends(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    url = sqlite_database(tmp_path) if backend == "sqlite" else request.getfixturevalue("pg_url")
    settings = api_settings(tmp_path / "state", url)
    try:
        with api_client(settings) as client:
            created = client.post("/v1/jobs", json=TRAIN_SPEC)
            assert created.status_code == 201, created.text
            job = created.json()
            assert created.headers["location"].endswith(f"/v1/jobs/{job['id']}")
            assert (job["status"], job["kind"], job["queue"], job["queue_position"]) == ("queued", "train", "cpu", 1)
            assert job["attempt"] == 1 and job["failure_reason"] is None and job["latest_metrics"] is None
            assert job["progress"] == {"epoch": 0, "epochs": None, "step": 0, "steps_per_epoch": None, "fraction": 0}
            # The stored spec is the resolved one: defaults written in, the data root made absolute.
            assert job["spec"]["method"]["name"] == "ce" and job["spec"]["optim"]["lr"] == 0.05
            assert job["spec"]["dataset"]["root"] == str((tmp_path / "state" / "data").resolve())
            # Committed, then sent: the embedded broker holds a message naming the job.
            assert job["dispatched_at"] is not None
            [message] = broker_messages(settings)
            assert job["id"] in message.read_text()

            fetched = client.get(f"/v1/jobs/{job['id']}")
            assert fetched.status_code == 200 and fetched.json() == job
            listed = client.get("/v1/jobs").json()
            assert [j["id"] for j in listed["items"]] == [job["id"]] and listed["total"] == 1
            assert client.get(f"/v1/jobs/{job['id']}/metrics").json() == []
    finally:
        empty_tables(url)


def test_validation_problem_names_each_field(client: TestClient) -> None:
    body = assert_problem(client.post("/v1/jobs", json={**TRAIN_SPEC, "model": "resnet9000", "colour": 1}), 422,
                          "validation")
    assert ["body", "model"] in error_locs(body) and ["body", "colour"] in error_locs(body)
    by_loc = {tuple(e["loc"]): e["msg"] for e in body["errors"]}
    assert "unknown architecture 'resnet9000'" in by_loc[("body", "model")]
    nested = assert_problem(client.post("/v1/jobs", json={**TRAIN_SPEC, "optim": {"epochs": 0}}), 422)
    assert ["body", "optim", "epochs"] in error_locs(nested)
    broken = client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert_problem(broken, 422, "validation")


def test_teacher_path_is_cli_only(client: TestClient, db: Session) -> None:
    body = assert_problem(client.post("/v1/jobs", json=distill({"path": "/tmp/t.pt"})), 422, "validation")
    assert error_locs(body) == [["body", "teacher", "path"]]
    assert "use job or upload" in body["detail"]
    assert db.scalar(select(func.count()).select_from(Job)) == 0


def test_dataset_roots_must_stay_inside_the_data_dirs(client: TestClient, settings: Settings, tmp_path: Path) -> None:
    data = settings.data_dirs[0]
    (data / "cifar").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (data / "escape").symlink_to(outside)

    def submit(root: str) -> Any:
        return client.post("/v1/jobs", json={**TRAIN_SPEC, "dataset": {"name": "digits", "root": root}})

    for root in ("../outside", str(outside), "/etc", "escape", "cifar/../../outside"):
        body = assert_problem(submit(root), 422, "validation")
        assert error_locs(body) == [["body", "dataset", "root"]]
        assert str(data.resolve()) in body["detail"], body["detail"]
    assert submit("cifar").json()["spec"]["dataset"]["root"] == str((data / "cifar").resolve())
    assert submit(str(data / "cifar")).status_code == 201


def test_distilling_from_a_teacher_job(client: TestClient, db: Session, settings: Settings) -> None:
    teacher = client.post("/v1/jobs", json=TRAIN_SPEC).json()
    waiting = client.post("/v1/jobs", json=distill({"job": teacher["id"]}))
    assert waiting.status_code == 201, waiting.text
    assert waiting.json()["status"] == "waiting" and waiting.json()["teacher_job_id"] == teacher["id"]
    assert waiting.json()["dispatched_at"] is None and waiting.json()["queue_position"] is None
    assert len(broker_messages(settings)) == 1  # only the teacher was sent

    done = add_job(db, JobStatus.succeeded)
    assert client.post("/v1/jobs", json=distill({"job": done.id})).json()["status"] == "queued"
    for status in (JobStatus.failed, JobStatus.cancelled):
        ended = add_job(db, status)
        body = assert_problem(client.post("/v1/jobs", json=distill({"job": ended.id})), 422, "validation")
        assert error_locs(body) == [["body", "teacher", "job"]] and str(status) in body["detail"]

    student = add_job(db, JobStatus.succeeded, kind="distill")
    assert "'train' job" in assert_problem(client.post("/v1/jobs", json=distill({"job": student.id})), 422)["detail"]
    wrong_arch = add_job(db, JobStatus.succeeded, spec={"model": "resnet14", "dataset": {"name": "digits"}})
    body = assert_problem(client.post("/v1/jobs", json=distill({"job": wrong_arch.id})), 422)
    assert error_locs(body) == [["body", "teacher", "architecture"]]
    other_data = add_job(db, JobStatus.succeeded, spec={"model": "resnet8", "dataset": {"name": "cifar100"}})
    assert "100 classes" in assert_problem(client.post("/v1/jobs", json=distill({"job": other_data.id})), 422)["detail"]
    assert_problem(client.post("/v1/jobs", json=distill({"job": new_id()})), 422)


def test_distilling_from_an_uploaded_teacher(client: TestClient, db: Session) -> None:
    upload = add_upload(db)
    job = client.post("/v1/jobs", json=distill({"upload": upload}))
    assert job.status_code == 201 and job.json()["teacher_upload_id"] == upload
    assert job.json()["spec"]["method"]["params"]["alpha"] == 1.01  # same family: resnet -> resnet

    wide = add_upload(db, architecture="wrn_16_1")
    body = assert_problem(client.post("/v1/jobs", json=distill({"upload": wide})), 422)
    assert error_locs(body) == [["body", "teacher", "architecture"]] and "wrn_16_1" in body["detail"]
    hundred = add_upload(db, num_classes=100)
    assert "has 10" in assert_problem(client.post("/v1/jobs", json=distill({"upload": hundred})), 422)["detail"]
    missing = assert_problem(client.post("/v1/jobs", json=distill({"upload": new_id()})), 422)
    assert error_locs(missing) == [["body", "teacher", "upload"]]


def test_a_down_broker_still_accepts_the_job(pg_url: str, tmp_path: Path) -> None:
    settings = api_settings(tmp_path / "state", pg_url, broker_url="redis://127.0.0.1:1/0",
                            broker_timeout_seconds=0.2)
    try:
        with api_client(settings) as client:
            started = time.monotonic()
            response = client.post("/v1/jobs", json=TRAIN_SPEC)
            assert time.monotonic() - started < 10
            assert response.status_code == 201, response.text
            assert response.json()["status"] == "queued" and response.json()["dispatched_at"] is None
            assert client.get(f"/v1/jobs/{response.json()['id']}").json()["dispatched_at"] is None
    finally:
        empty_tables(pg_url)


def test_cancel_in_every_state(client: TestClient, db: Session) -> None:
    queued = client.post("/v1/jobs", json=TRAIN_SPEC).json()
    answer = client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert answer.status_code == 202 and answer.json()["status"] == "cancelled"
    assert answer.json()["finished_at"] is not None and answer.json()["queue_position"] is None

    waiting = add_job(db, JobStatus.waiting, kind="distill")
    assert client.post(f"/v1/jobs/{waiting.id}/cancel").json()["status"] == "cancelled"
    now = utcnow()
    running = add_job(db, JobStatus.running, lease_owner="w", lease_expires_at=now + timedelta(minutes=1),
                      started_at=now)
    first = client.post(f"/v1/jobs/{running.id}/cancel")
    assert first.status_code == 202
    assert (first.json()["status"], first.json()["cancel_requested"]) == ("cancelling", True)
    assert client.post(f"/v1/jobs/{running.id}/cancel").json()["status"] == "cancelling"

    for ended in (queued["id"], add_job(db, JobStatus.succeeded).id):
        body = assert_problem(client.post(f"/v1/jobs/{ended}/cancel"), 409, "job-already-ended")
        assert "already" in body["detail"]
    assert_problem(client.post(f"/v1/jobs/{new_id()}/cancel"), 404, "job-not-found")


def test_pages_filters_and_order(client: TestClient, db: Session) -> None:
    base = utcnow() - timedelta(hours=1)
    statuses = [JobStatus.queued, JobStatus.running, JobStatus.succeeded, JobStatus.queued, JobStatus.failed]
    made = [add_job(db, status, created_at=base + timedelta(minutes=i), kind="distill" if i % 2 else "train")
            for i, status in enumerate(statuses)]
    newest_first = [j.id for j in reversed(made)]

    seen, cursor = [], None
    while True:
        page = client.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        assert page["total"] == 5 and len(page["items"]) <= 2
        seen += [j["id"] for j in page["items"]]
        if not (cursor := page["next_cursor"]):
            break
    assert seen == newest_first

    by_offset = client.get("/v1/jobs", params={"limit": 2, "offset": 2}).json()
    assert [j["id"] for j in by_offset["items"]] == newest_first[2:4]
    active = client.get("/v1/jobs", params=[("status", "queued"), ("status", "running")]).json()
    assert {j["id"] for j in active["items"]} == {made[0].id, made[1].id, made[3].id} and active["total"] == 3
    students = client.get("/v1/jobs", params={"kind": "distill"}).json()
    assert [j["id"] for j in students["items"]] == [made[3].id, made[1].id]

    assert error_locs(assert_problem(client.get("/v1/jobs", params={"status": "asleep"}), 422)) == [
        ["query", "status", 0]]
    assert_problem(client.get("/v1/jobs", params={"limit": 0}), 422)
    assert error_locs(assert_problem(client.get("/v1/jobs", params={"cursor": "%%%"}), 422)) == [["query", "cursor"]]


def test_queue_position_counts_earlier_jobs_of_the_same_queue(client: TestClient, db: Session) -> None:
    base = utcnow() - timedelta(minutes=10)
    cpu = [add_job(db, created_at=base + timedelta(seconds=i)) for i in range(3)]
    gpu = add_job(db, created_at=base, queue="cuda")
    running = add_job(db, JobStatus.running, created_at=base - timedelta(seconds=1))

    def position(job_id: str) -> int | None:
        value: int | None = client.get(f"/v1/jobs/{job_id}").json()["queue_position"]
        return value

    assert [position(j.id) for j in cpu] == [1, 2, 3]
    assert (position(gpu.id), position(running.id)) == (1, None)
    client.post(f"/v1/jobs/{cpu[0].id}/cancel")
    assert [position(j.id) for j in cpu[1:]] == [1, 2]
    late = client.post("/v1/jobs", json={**TRAIN_SPEC, "device": "cuda"}).json()
    assert (late["queue"], late["queue_position"]) == ("cuda", 2)


def test_progress_and_metric_series(client: TestClient, db: Session) -> None:
    job = add_job(db, JobStatus.running, epoch=2, epochs=5, step=7, steps_per_epoch=10, fraction=0.34)
    record_metrics(db, job.id, 2, {"top1": 0.5, "loss": 1.0})
    record_metrics(db, job.id, 1, {"top1": 0.25, "loss": 2.0})
    db.commit()
    series = client.get(f"/v1/jobs/{job.id}/metrics").json()
    assert series == [{"epoch": 1, "top1": 0.25, "loss": 2.0}, {"epoch": 2, "top1": 0.5, "loss": 1.0}]
    shown = client.get(f"/v1/jobs/{job.id}").json()
    assert shown["progress"] == {"epoch": 2, "epochs": 5, "step": 7, "steps_per_epoch": 10, "fraction": 0.34}
    assert shown["latest_metrics"] == {"top1": 0.25, "loss": 2.0}  # the last recorded
    failed = add_job(db, JobStatus.failed, failure_reason="RuntimeError: out of memory")
    assert client.get(f"/v1/jobs/{failed.id}").json()["failure_reason"] == "RuntimeError: out of memory"


def test_unknown_things_are_404_problems(client: TestClient) -> None:
    missing = new_id()
    for path in (f"/v1/jobs/{missing}", f"/v1/jobs/{missing}/metrics", f"/v1/jobs/{missing}/artifacts"):
        assert missing in assert_problem(client.get(path), 404, "job-not-found")["detail"]
    assert_problem(client.get(f"/v1/teachers/{missing}"), 404, "teacher-not-found")
    assert_problem(client.get("/v1/nothing-here"), 404, None)
    assert_problem(client.delete("/v1/jobs"), 405, None)


def test_catalog(client: TestClient) -> None:
    models = {m["name"]: m["family"] for m in client.get("/v1/models").json()}
    assert models["resnet8"] == "resnet" and "wrn_40_2" in models
    methods = {m["name"]: m for m in client.get("/v1/methods").json()}
    assert methods["itrd"]["needs_teacher"] and not methods["ce"]["needs_teacher"]
    assert {"beta_corr", "beta_mi", "alpha"} <= set(methods["itrd"]["defaults"])
    presets = {p["name"]: p for p in client.get("/v1/presets").json()}
    demo = presets["demo-digits"]
    assert (demo["teacher"], demo["student"], demo["dataset"]) == ("resnet20", "resnet8", "digits")
    assert demo["spec"]["model"] == "resnet8" and demo["teacher_spec"]["kind"] == "train"
    assert client.get("/docs").status_code == 200 and "/v1/jobs" in client.get("/openapi.json").json()["paths"]


def test_health_and_readiness(client: TestClient, pg_url: str, tmp_path: Path) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert all(check["ok"] for check in ready.json()["checks"].values())

    bad_broker = api_settings(tmp_path / "other", pg_url, broker_url="redis://127.0.0.1:1/0")
    with api_client(bad_broker) as other:
        body = assert_problem(other.get("/readyz"), 503, "not-ready")
        assert "broker" in body["detail"] and not body["checks"]["broker"]["ok"]
        assert body["checks"]["database"]["ok"] and body["checks"]["migrations"]["ok"]
        assert other.get("/healthz").status_code == 200
    unmigrated = api_settings(tmp_path / "bare", f"sqlite:///{tmp_path / 'bare.db'}")
    with api_client(unmigrated, owner=None) as bare:
        body = assert_problem(bare.get("/readyz"), 503, "not-ready")
        assert not body["checks"]["migrations"]["ok"] and body["checks"]["broker"]["ok"]


def test_the_reaper_runs_inside_the_api(pg_url: str, tmp_path: Path, db: Session) -> None:
    settings = api_settings(tmp_path / "state", pg_url, reaper_in_api=True, reap_seconds=0.05)
    unsent = add_job(db)  # queued with no dispatched_at: as if the broker had been down
    with api_client(settings) as client:
        reaper = client.app.state.reaper  # type: ignore[attr-defined]
        assert reaper.is_alive()
        deadline = time.monotonic() + 10
        while client.get(f"/v1/jobs/{unsent.id}").json()["dispatched_at"] is None:
            assert time.monotonic() < deadline, "the reaper never sent the job"
            time.sleep(0.05)
        assert len(broker_messages(settings)) == 1
    assert not reaper.is_alive()


def test_unexpected_errors_are_problems_too(tmp_path: Path) -> None:
    from service.api.app import create_app

    unmigrated = api_settings(tmp_path / "bare", f"sqlite:///{tmp_path / 'bare.db'}")
    with TestClient(create_app(unmigrated), raise_server_exceptions=False) as client:
        # A well-formed key, so that looking it up is what meets the missing table.
        body = assert_problem(client.get("/v1/jobs", headers=bearer("itrd_0123456789ab_secret")), 500, None)
        assert "no such table" not in body["detail"]  # internals stay in the server log
