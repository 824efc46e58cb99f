"""The artifact stores: a local directory and S3 (a real moto server over HTTP)."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from service import storage
from service.config import get_settings
from service.storage import (
    ArtifactNotFound,
    ArtifactStore,
    InvalidArtifactName,
    LocalArtifactStore,
    S3ArtifactStore,
    store_from_settings,
)

JOB = "0123456789abcdef0123456789abcdef"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free local port, for the whole test session."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client on the moto server."""
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **CREDENTIALS)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    """Each store, empty: a fresh directory, or a fresh bucket."""
    if request.param == "local":
        return LocalArtifactStore(tmp_path / "artifacts")
    client = s3_client(request.getfixturevalue("s3_endpoint"))
    bucket = f"itrd-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return S3ArtifactStore(bucket, "runs/", client=client)


def write(path: Path, size: int) -> bytes:
    """Write `size` reproducible, non-repeating bytes to `path` and return them."""
    data = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(size // 32 + 1))[:size]
    path.write_bytes(data)
    return data


def read(store: ArtifactStore, name: str, start: int = 0, stop: int | None = None) -> bytes:
    """An artifact's bytes [start, stop), joined from the store's chunks."""
    return b"".join(store.iter_range(JOB, name, start, stop))


def test_put_list_and_read_back(store: ArtifactStore, tmp_path: Path) -> None:
    assert isinstance(store, ArtifactStore)
    assert store.list(JOB) == []
    data = write(tmp_path / "src", 1000)
    assert store.put_file(JOB, "last.ckpt", tmp_path / "src") == (1000, hashlib.sha256(data).hexdigest())
    write(tmp_path / "small", 3)
    store.put_file(JOB, "metrics.json", tmp_path / "small")
    store.put_file("other-job", "last.ckpt", tmp_path / "small")
    assert store.list(JOB) == ["last.ckpt", "metrics.json"]
    assert store.list("other-job") == ["last.ckpt"]
    assert store.exists(JOB, "last.ckpt") and not store.exists(JOB, "best.ckpt")
    assert store.size(JOB, "last.ckpt") == 1000
    assert read(store, "last.ckpt") == data
    store.get_file(JOB, "last.ckpt", tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == data


@pytest.mark.parametrize(("start", "stop"), [(0, 1), (10, 500), (999, 1000), (0, None), (500, None), (7, 7)])
def test_range_reads(store: ArtifactStore, tmp_path: Path, start: int, stop: int | None) -> None:
    data = write(tmp_path / "src", 1000)
    store.put_file(JOB, "a.bin", tmp_path / "src")
    assert read(store, "a.bin", start, stop) == data[start:stop]


def test_large_file_streams_in_chunks(store: ArtifactStore, tmp_path: Path) -> None:
    size = 2 * storage.CHUNK_SIZE + 12345
    data = write(tmp_path / "src", size)
    assert store.put_file(JOB, "big.bin", tmp_path / "src") == (size, hashlib.sha256(data).hexdigest())
    chunks = list(store.iter_range(JOB, "big.bin"))
    assert len(chunks) >= 3 and max(map(len, chunks)) <= storage.CHUNK_SIZE
    assert b"".join(chunks) == data
    start, stop = storage.CHUNK_SIZE - 10, storage.CHUNK_SIZE + 10
    assert read(store, "big.bin", start, stop) == data[start:stop]


def test_bad_ranges_and_missing_artifacts(store: ArtifactStore, tmp_path: Path) -> None:
    write(tmp_path / "src", 100)
    store.put_file(JOB, "a.bin", tmp_path / "src")
    for start, stop in [(-1, 10), (50, 10), (0, 101), (101, None)]:
        with pytest.raises(ValueError, match="outside"):
            store.iter_range(JOB, "a.bin", start, stop)
    with pytest.raises(ArtifactNotFound):
        store.size(JOB, "b.bin")
    with pytest.raises(ArtifactNotFound):
        store.iter_range(JOB, "b.bin")
    with pytest.raises(ArtifactNotFound):
        store.get_file(JOB, "b.bin", tmp_path / "dest")


def test_overwrite_and_delete(store: ArtifactStore, tmp_path: Path) -> None:
    write(tmp_path / "one", 10)
    new = write(tmp_path / "two", 20)
    store.put_file(JOB, "last.ckpt", tmp_path / "one")
    store.put_file(JOB, "last.ckpt", tmp_path / "two")
    assert read(store, "last.ckpt") == new
    store.delete(JOB, "last.ckpt")
    store.delete(JOB, "last.ckpt")
    assert not store.exists(JOB, "last.ckpt") and store.list(JOB) == []


BAD_NAMES = ["", ".", "..", "../x", "a/b", "a\\b", ".hidden", "a..b", "x" * 129, "naïve", "a b", "-", "a\x00"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_names_are_validated(store: ArtifactStore, tmp_path: Path, bad: str) -> None:
    write(tmp_path / "src", 1)
    with pytest.raises(InvalidArtifactName):
        store.put_file(JOB, bad, tmp_path / "src")
    with pytest.raises(InvalidArtifactName):
        store.put_file(bad, "ok.bin", tmp_path / "src")
    with pytest.raises(InvalidArtifactName):
        store.exists(JOB, bad)
    with pytest.raises(InvalidArtifactName):
        store.list(bad)
    assert storage.validate_name("model_best-v2.ckpt") == "model_best-v2.ckpt"


def test_s3_layout_and_checksum_metadata(s3_endpoint: str, tmp_path: Path) -> None:
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket="layout")
    store = S3ArtifactStore("layout", "/a/b/", client=client)
    data = write(tmp_path / "src", 64)
    store.put_file(JOB, "last.ckpt", tmp_path / "src")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="layout")["Contents"]]
    assert keys == [f"a/b/{JOB}/last.ckpt"]
    head = client.head_object(Bucket="layout", Key=keys[0])
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_local_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    old = write(tmp_path / "old", 100)
    store.put_file(JOB, "last.ckpt", tmp_path / "old")
    write(tmp_path / "new", 3 * storage.CHUNK_SIZE)
    real_fdopen = os.fdopen

    class DiskFull:
        """A file that takes one chunk, then runs out of space."""

        def __init__(self, fd: int, *args: Any, **kwargs: Any) -> None:
            self.file = real_fdopen(fd, *args, **kwargs)
            self.written = 0

        def write(self, chunk: bytes) -> int:
            if self.written:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(chunk)
            return self.file.write(chunk)

        def __enter__(self) -> DiskFull:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

    monkeypatch.setattr(storage.os, "fdopen", DiskFull)
    with pytest.raises(OSError, match="No space"):
        store.put_file(JOB, "last.ckpt", tmp_path / "new")
    with pytest.raises(OSError, match="No space"):
        store.put_file(JOB, "fresh.ckpt", tmp_path / "new")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "artifacts" / JOB).iterdir()) == ["last.ckpt"]
    assert read(store, "last.ckpt") == old
    assert not store.exists(JOB, "fresh.ckpt")


def test_local_failed_fsync_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    write(tmp_path / "src", 100)

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(storage.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="I/O error"):
        store.put_file(JOB, "last.ckpt", tmp_path / "src")
    monkeypatch.undo()
    assert list((tmp_path / "artifacts" / JOB).iterdir()) == []


def test_local_store_ignores_temp_files_and_refuses_symlinks_out(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    write(tmp_path / "src", 10)
    store.put_file(JOB, "last.ckpt", tmp_path / "src")
    (tmp_path / "artifacts" / JOB / ".last.ckpt.abc.tmp").write_bytes(b"partial")
    assert store.list(JOB) == ["last.ckpt"]

    outside = tmp_path / "outside"
    outside.mkdir()
    write(outside / "secret", 5)
    (tmp_path / "artifacts" / JOB / "link.bin").symlink_to(outside / "secret")
    (tmp_path / "artifacts" / "linkedjob").symlink_to(outside)
    with pytest.raises(InvalidArtifactName, match="outside"):
        store.size(JOB, "link.bin")
    with pytest.raises(InvalidArtifactName, match="outside"):
        store.put_file("linkedjob", "x.bin", tmp_path / "src")
    with pytest.raises(InvalidArtifactName, match="outside"):
        store.iter_range("linkedjob", "secret")
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


def test_store_from_settings(monkeypatch: pytest.MonkeyPatch, s3_endpoint: str) -> None:
    local = store_from_settings()
    assert isinstance(local, LocalArtifactStore)
    assert local.root == get_settings().state_dir / "artifacts"

    monkeypatch.setenv("ITRD_ARTIFACT_STORE", "s3://from-settings/some/prefix")
    monkeypatch.setenv("ITRD_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    get_settings.cache_clear()
    remote = store_from_settings()
    assert isinstance(remote, S3ArtifactStore)
    assert (remote.bucket, remote.prefix) == ("from-settings", "some/prefix")
    s3_client(s3_endpoint).create_bucket(Bucket="from-settings")
    assert remote.list(JOB) == []

    for bad in ("s3://", "gs://bucket", "/plain/path"):
        monkeypatch.setenv("ITRD_ARTIFACT_STORE", bad)
        get_settings.cache_clear()
        with pytest.raises(ValueError, match="ITRD_ARTIFACT_STORE"):
            store_from_settings()
