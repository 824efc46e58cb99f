"""The artifact store: files jobs produce (checkpoints, exports), in a local directory or an S3 bucket.

Artifacts live under `<job_id>/<name>`; both parts must be plain file names, so no artifact can be
read or written outside its job's folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import boto3
from botocore.exceptions import ClientError

from service.config import Settings, get_settings

CHUNK_SIZE = 1024 * 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class InvalidArtifactName(ValueError):
    """A job id or artifact name that is not a plain, safe file name."""


class ArtifactNotFound(FileNotFoundError):
    """No artifact of that name for that job."""


def validate_name(name: str, what: str = "artifact name") -> str:
    """Return `name` if it is a plain file name (letters, digits, . _ -; no leading dot, no '..')."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise InvalidArtifactName(
            f"{what} {name!r} must be 1-128 characters of letters, digits, '.', '_' or '-', "
            "start with a letter or digit, and not contain '..'"
        )
    return name


def _check_range(start: int, stop: int | None, size: int) -> int:
    """Validate a byte range against the artifact size; returns the concrete stop."""
    stop = size if stop is None else stop
    if not 0 <= start <= stop <= size:
        raise ValueError(f"byte range [{start}, {stop}) is outside the artifact's {size} bytes")
    return stop


def _hash_file(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as source:
        while chunk := source.read(CHUNK_SIZE):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


@runtime_checkable
class ArtifactStore(Protocol):
    """Where job artifacts are kept. `stop` in byte ranges is exclusive, as in Python slices."""

    def put_file(self, job_id: str, name: str, path: Path) -> tuple[int, str]:
        """Store the file at `path` as the job's artifact `name` (replacing it); returns (size, sha256)."""

    def get_file(self, job_id: str, name: str, dest: Path) -> None:
        """Copy an artifact to the local path `dest` (e.g. a checkpoint to resume from)."""

    def iter_range(
        self, job_id: str, name: str, start: int = 0, stop: int | None = None
    ) -> Iterator[bytes]:
        """Yield the bytes [start, stop) of an artifact in chunks (stop None: to the end)."""

    def size(self, job_id: str, name: str) -> int:
        """Size in bytes of an artifact; raises ArtifactNotFound."""

    def exists(self, job_id: str, name: str) -> bool:
        """Whether the artifact exists."""

    def delete(self, job_id: str, name: str) -> None:
        """Remove an artifact (no error if it is already gone)."""

    def list(self, job_id: str) -> list[str]:
        """The names of a job's artifacts, sorted."""


class LocalArtifactStore:
    """Artifacts as files under a root directory; a write is atomic (temp file, fsync, rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()

    def path(self, job_id: str, name: str) -> Path:
        """The file of an artifact, refused if it would resolve outside its job's folder."""
        job_dir = self.root / validate_name(job_id, "job id")
        path = job_dir / validate_name(name)
        # A symlink (the job folder or the file) must not lead the store elsewhere.
        if path.resolve().parent != job_dir:
            raise InvalidArtifactName(f"artifact {job_id}/{name} resolves outside its job's folder")
        return path

    def put_file(self, job_id: str, name: str, path: Path) -> tuple[int, str]:
        """Store the file at `path` as the job's artifact `name` (replacing it); returns (size, sha256)."""
        dest = self.path(job_id, name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Same folder as the destination, so the rename is atomic; the leading dot keeps it out of list().
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{name}.", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as out:
                with Path(path).open("rb") as source:
                    while chunk := source.read(CHUNK_SIZE):
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            tmp.chmod(0o644)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(dest.parent)
        return size, digest.hexdigest()

    def get_file(self, job_id: str, name: str, dest: Path) -> None:
        """Copy an artifact to the local path `dest`."""
        try:
            shutil.copyfile(self.path(job_id, name), dest)
        except FileNotFoundError as err:
            raise ArtifactNotFound(f"no artifact {job_id}/{name}") from err

    def iter_range(
        self, job_id: str, name: str, start: int = 0, stop: int | None = None
    ) -> Iterator[bytes]:
        """Yield the bytes [start, stop) of an artifact in chunks; checks the range before streaming."""
        stop = _check_range(start, stop, self.size(job_id, name))
        return self._stream(self.path(job_id, name), start, stop)

    @staticmethod
    def _stream(path: Path, start: int, stop: int) -> Iterator[bytes]:
        with path.open("rb") as source:
            source.seek(start)
            remaining = stop - start
            while remaining > 0 and (chunk := source.read(min(CHUNK_SIZE, remaining))):
                remaining -= len(chunk)
                yield chunk

    def size(self, job_id: str, name: str) -> int:
        """Size in bytes of an artifact; raises ArtifactNotFound."""
        path = self.path(job_id, name)
        if not path.is_file():
            raise ArtifactNotFound(f"no artifact {job_id}/{name}")
        return path.stat().st_size

    def exists(self, job_id: str, name: str) -> bool:
        """Whether the artifact exists."""
        return self.path(job_id, name).is_file()

    def delete(self, job_id: str, name: str) -> None:
        """Remove an artifact (no error if it is already gone)."""
        self.path(job_id, name).unlink(missing_ok=True)

    def list(self, job_id: str) -> list[str]:
        """The names of a job's artifacts, sorted (temp files of writes in flight excluded)."""
        job_dir = self.root / validate_name(job_id, "job id")
        if not job_dir.is_dir():
            return []
        return sorted(p.name for p in job_dir.iterdir() if p.is_file() and _is_valid(p.name))


def _is_valid(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and ".." not in name


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _missing(err: ClientError) -> bool:
    return str(err.response.get("Error", {}).get("Code")) in {"404", "NoSuchKey", "NotFound"}


class S3ArtifactStore:
    """Artifacts as objects `<prefix>/<job_id>/<name>` in an S3-compatible bucket.

    Credentials come from boto3's usual sources (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...).
    An upload becomes visible only once complete, so readers never see a partial object.
    """

    def __init__(
        self, bucket: str, prefix: str = "", endpoint_url: str | None = None,
        region_name: str | None = None, client: Any = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url, region_name=region_name)

    def _job_prefix(self, job_id: str) -> str:
        job = validate_name(job_id, "job id")
        return f"{self.prefix}/{job}/" if self.prefix else f"{job}/"

    def key(self, job_id: str, name: str) -> str:
        """The object key of an artifact."""
        return self._job_prefix(job_id) + validate_name(name)

    def put_file(self, job_id: str, name: str, path: Path) -> tuple[int, str]:
        """Upload the file at `path` as the job's artifact `name` (replacing it); returns (size, sha256)."""
        key = self.key(job_id, name)
        size, digest = _hash_file(Path(path))
        self.client.upload_file(str(path), self.bucket, key, ExtraArgs={"Metadata": {"sha256": digest}})
        return size, digest

    def get_file(self, job_id: str, name: str, dest: Path) -> None:
        """Download an artifact to the local path `dest`."""
        key = self.key(job_id, name)
        try:
            self.client.download_file(self.bucket, key, str(dest))
        except ClientError as err:
            if _missing(err):
                raise ArtifactNotFound(f"no artifact {job_id}/{name}") from err
            raise

    def iter_range(
        self, job_id: str, name: str, start: int = 0, stop: int | None = None
    ) -> Iterator[bytes]:
        """Yield the bytes [start, stop) of an artifact (one ranged GetObject); checks the range first."""
        stop = _check_range(start, stop, self.size(job_id, name))
        return self._stream(self.key(job_id, name), start, stop)

    def _stream(self, key: str, start: int, stop: int) -> Iterator[bytes]:
        if start == stop:
            return
        # HTTP ranges include their last byte.
        response = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{stop - 1}")
        body = response["Body"]
        try:
            yield from body.iter_chunks(CHUNK_SIZE)
        finally:
            body.close()

    def size(self, job_id: str, name: str) -> int:
        """Size in bytes of an artifact; raises ArtifactNotFound."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(job_id, name))
        except ClientError as err:
            if _missing(err):
                raise ArtifactNotFound(f"no artifact {job_id}/{name}") from err
            raise
        return int(head["ContentLength"])

    def exists(self, job_id: str, name: str) -> bool:
        """Whether the artifact exists."""
        try:
            self.size(job_id, name)
        except ArtifactNotFound:
            return False
        return True

    def delete(self, job_id: str, name: str) -> None:
        """Remove an artifact (no error if it is already gone)."""
        self.client.delete_object(Bucket=self.bucket, Key=self.key(job_id, name))

    def list(self, job_id: str) -> list[str]:
        """The names of a job's artifacts, sorted."""
        prefix = self._job_prefix(job_id)
        names: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            names += [obj["Key"][len(prefix):] for obj in page.get("Contents", [])]
        return sorted(n for n in names if _is_valid(n))


def store_from_settings(settings: Settings | None = None) -> ArtifactStore:
    """The artifact store ITRD_ARTIFACT_STORE names: file://<dir> or s3://<bucket>[/<prefix>]."""
    settings = settings or get_settings()
    url = settings.artifact_store
    if url.startswith("file://"):
        return LocalArtifactStore(Path(url.removeprefix("file://")))
    if url.startswith("s3://"):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if bucket:
            return S3ArtifactStore(
                bucket, prefix, endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region
            )
    raise ValueError(f"ITRD_ARTIFACT_STORE must be file://<dir> or s3://<bucket>[/<prefix>], not {url!r}")
