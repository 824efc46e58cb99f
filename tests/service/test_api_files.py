"""Files over the API: teacher uploads (safe, strict, size-limited) and artifact downloads with Range."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from api_support import OWNER, api_settings, assert_problem, empty_tables, error_locs
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from itrd.models import create_model
from service.config import Settings
from service.models import Job, JobStatus, TeacherUpload, new_id, record_artifact, utcnow
from service.storage import LocalArtifactStore, store_from_settings

FILE = os.urandom(3000)


class RunsCode:
    """Unpickling this calls open(path, 'w'): a stand-in for a checkpoint that runs code when loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(self.path), "w")


@pytest.fixture
def settings(pg_url: str, tmp_path: Path) -> Iterator[Settings]:
    """Embedded settings on PostgreSQL with a small upload limit (resnet8's weights fit)."""
    yield api_settings(tmp_path / "state", pg_url, upload_max_bytes=1_000_000)
    empty_tables(pg_url)


def torch_bytes(obj: Any) -> bytes:
    """What torch.save writes for `obj`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def upload(client: TestClient, content: bytes, architecture: str = "resnet8", num_classes: int = 10) -> Any:
    """POST /v1/teachers with a file."""
    return client.post("/v1/teachers", data={"architecture": architecture, "num_classes": str(num_classes)},
                       files={"file": ("teacher.pt", content, "application/octet-stream")})


def assert_nothing_stored(db: Session, settings: Settings) -> None:
    """No teacher row and no stored object: a refused upload leaves no trace."""
    assert db.scalar(select(func.count()).select_from(TeacherUpload)) == 0
    root = Path(settings.artifact_store.removeprefix("file://"))
    assert not list(root.glob("upload-*/*"))


def test_a_good_upload_is_stored_as_safetensors(client: TestClient, settings: Settings, db: Session) -> None:
    state = create_model("resnet8", 10).state_dict()
    answer = upload(client, torch_bytes(state))
    assert answer.status_code == 201, answer.text
    teacher = answer.json()
    assert (teacher["architecture"], teacher["num_classes"]) == ("resnet8", 10)
    assert answer.headers["location"].endswith(f"/v1/teachers/{teacher['id']}")
    stored = Path(settings.artifact_store.removeprefix("file://")) / f"upload-{teacher['id']}" / "weights.safetensors"
    assert teacher["sha256"] == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert teacher["size"] == stored.stat().st_size
    loaded = load_file(stored)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert client.get(f"/v1/teachers/{teacher['id']}").json() == teacher

    # A checkpoint dict holding the weights under 'model', and a safetensors file, are accepted too.
    assert upload(client, torch_bytes({"model": state, "epoch": 240})).status_code == 201
    assert upload(client, save({k: v.contiguous() for k, v in state.items()})).status_code == 201
    listed = client.get("/v1/teachers").json()
    assert listed["total"] == 3 and listed["items"][-1]["id"] == teacher["id"]
    job = client.post("/v1/jobs", json={"model": "resnet8", "teacher": {"architecture": "resnet8",
                                                                         "upload": teacher["id"]}})
    assert job.status_code == 201 and job.json()["status"] == "queued"


def test_a_repdistiller_teacher_upload_is_stored_in_our_layout(client: TestClient, settings: Settings) -> None:
    from itrd.models.convert import repdistiller_keys

    state = create_model("resnet8", 10).state_dict()
    names = repdistiller_keys("resnet8")
    theirs = {names[k]: v for k, v in state.items()}  # the tensors under RepDistiller's key names
    answer = upload(client, torch_bytes({"epoch": 240, "model": theirs, "accuracy": torch.tensor(90.0)}))
    assert answer.status_code == 201, answer.text
    stored = Path(settings.artifact_store.removeprefix("file://")) / f"upload-{answer.json()['id']}"
    loaded = load_file(stored / "weights.safetensors")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_bad_uploads_say_why_and_store_nothing(client: TestClient, settings: Settings, db: Session) -> None:
    other = torch_bytes(create_model("resnet14", 10).state_dict())
    assert "do not fit architecture 'resnet8'" in assert_problem(upload(client, other), 422, "bad-weights")["detail"]
    classes = torch_bytes(create_model("resnet8", 100).state_dict())
    assert "shape mismatch" in assert_problem(upload(client, classes), 422, "bad-weights")["detail"]
    assert "cannot read" in assert_problem(upload(client, b"not a checkpoint"), 422, "bad-weights")["detail"]
    assert "no state dict" in assert_problem(upload(client, torch_bytes([1, 2])), 422, "bad-weights")["detail"]
    unknown = assert_problem(upload(client, other, architecture="resnet9000"), 422, "validation")
    assert error_locs(unknown) == [["body", "architecture"]]
    no_file = client.post("/v1/teachers", data={"architecture": "resnet8", "num_classes": "10"})
    assert ["body", "file"] in error_locs(assert_problem(no_file, 422, "validation"))
    assert_nothing_stored(db, settings)


def test_a_pickle_that_runs_code_is_refused_unrun(client: TestClient, settings: Settings, db: Session,
                                                  tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    bomb = torch_bytes({"conv1.weight": torch.zeros(1), "payload": RunsCode(marker)})
    body = assert_problem(upload(client, bomb), 422, "bad-weights")
    assert "refused: loading this file would call" in body["detail"] and "open" in body["detail"]
    assert not marker.exists()
    assert_nothing_stored(db, settings)


def test_oversized_uploads_are_413(client: TestClient, settings: Settings, db: Session) -> None:
    # Over the limit by a little: the body passes the stream counter, the file copy stops it.
    body = assert_problem(upload(client, b"\0" * 1_000_001), 413, "upload-too-large")
    assert "1000000 bytes" in body["detail"]
    # Far over, with a Content-Length: refused before the body is read.
    assert_problem(upload(client, b"\0" * 1_100_000), 413, None)
    # Far over, streamed without a Content-Length: refused once the count passes the limit.
    chunks = iter([b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"t.pt\"\r\n\r\n",
                   *[b"\0" * 65536] * 20])
    streamed = client.post("/v1/teachers", content=chunks,
                           headers={"content-type": "multipart/form-data; boundary=b"})
    assert "transfer-encoding" in {k.lower() for k in streamed.request.headers}
    assert_problem(streamed, 413, None)
    assert_nothing_stored(db, settings)


@pytest.fixture
def artifact(db: Session, settings: Settings) -> str:
    """A succeeded job with one 3000-byte artifact, 'last.pt', in the store and on record."""
    job = Job(id=new_id(), kind="train", spec={"model": "resnet8"}, status=JobStatus.succeeded, created_at=utcnow(),
              owner=OWNER)
    db.add(job)
    db.commit()
    source = settings.state_dir / "last.pt"
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_bytes(FILE)
    size, digest = store_from_settings(settings).put_file(job.id, "last.pt", source)
    record_artifact(db, job.id, "last.pt", size, digest)
    db.commit()
    return job.id


def test_artifact_list(client: TestClient, artifact: str) -> None:
    [item] = client.get(f"/v1/jobs/{artifact}/artifacts").json()["items"]
    assert item["name"] == "last.pt" and item["size"] == len(FILE)
    assert item["sha256"] == hashlib.sha256(FILE).hexdigest() and item["created_at"]
    assert item["url"] == f"/v1/jobs/{artifact}/artifacts/last.pt"


@pytest.mark.parametrize(("header", "start", "stop"), [
    ("bytes=0-99", 0, 100),
    ("bytes=2900-", 2900, 3000),
    ("bytes=-50", 2950, 3000),
    ("bytes=100-999999", 100, 3000),
    ("bytes=-999999", 0, 3000),
    ("bytes=2999-2999", 2999, 3000),
])
def test_ranges(client: TestClient, artifact: str, header: str, start: int, stop: int) -> None:
    answer = client.get(f"/v1/jobs/{artifact}/artifacts/last.pt", headers={"Range": header})
    assert answer.status_code == 206
    assert answer.content == FILE[start:stop]
    assert answer.headers["content-range"] == f"bytes {start}-{stop - 1}/{len(FILE)}"
    assert answer.headers["content-length"] == str(stop - start)
    assert answer.headers["etag"] == f'"{hashlib.sha256(FILE).hexdigest()}"'


def test_whole_downloads_and_ranges_we_ignore_or_refuse(client: TestClient, artifact: str) -> None:
    url = f"/v1/jobs/{artifact}/artifacts/last.pt"
    whole = client.get(url)
    assert whole.status_code == 200 and whole.content == FILE
    assert whole.headers["accept-ranges"] == "bytes" and whole.headers["content-length"] == str(len(FILE))
    etag = whole.headers["etag"]
    for ignored in ("bytes=0-1,5-6", "items=0-5", "bytes=abc", "bytes=9-3"):
        answer = client.get(url, headers={"Range": ignored})
        assert (answer.status_code, answer.content) == (200, FILE), ignored
    # If-Range: a stale validator gets the whole (new) file, the current one gets the range.
    assert client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"stale"'}).status_code == 200
    assert client.get(url, headers={"Range": "bytes=0-9", "If-Range": etag}).content == FILE[:10]
    for unsatisfiable in ("bytes=3000-", "bytes=5000-6000", "bytes=-0"):
        body = assert_problem(client.get(url, headers={"Range": unsatisfiable}), 416, "range-not-satisfiable")
        assert body["detail"]
    assert client.get(url, headers={"Range": "bytes=3000-"}).headers["content-range"] == "bytes */3000"


def test_artifact_names_are_checked_before_any_file_is_touched(
    client: TestClient, artifact: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    touched: list[str] = []
    monkeypatch.setattr(LocalArtifactStore, "path", lambda self, *a: touched.append("path"))
    for name in (".hidden", "a..b", "%2E%2E", "x%00y"):
        assert_problem(client.get(f"/v1/jobs/{artifact}/artifacts/{name}"), 404, "artifact-not-found")
    assert touched == []
    monkeypatch.undo()
    assert_problem(client.get(f"/v1/jobs/{artifact}/artifacts/best.pt"), 404, "artifact-not-found")
    assert_problem(client.get(f"/v1/jobs/{new_id()}/artifacts/last.pt"), 404, "job-not-found")
