"""Checkpoint files: written atomically with a sha256 beside them, read without unpickling code.

Each checkpoint `X.pt` has a sidecar `X.pt.sha256`. Saving writes both to temporary files in the same
directory, fsyncs them, moves the previous pair to `X.prev.pt` / `X.prev.pt.sha256`, then renames the
new pair into place. A crash at any moment leaves at least one complete, verifiable checkpoint; a
file whose bytes do not match its recorded sha256 is refused at load time.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

CHECKSUM_SUFFIX = ".sha256"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt, or not one of ours."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to `path` through a temporary file in the same directory, fsync and rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _previous(path: Path) -> Path:
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(state: dict[str, Any], path: Path, keep_previous: bool = True) -> str:
    """Serialise `state` to `path` atomically; returns its sha256. The old file becomes `X.prev.pt`."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp_sum = path.with_name(f".{path.name}{CHECKSUM_SUFFIX}.tmp-{os.getpid()}")
    try:
        for target, payload in ((tmp, data), (tmp_sum, f"{digest}  {path.name}\n".encode())):
            with open(target, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
        if keep_previous and path.exists():
            prev = _previous(path)
            os.replace(path, prev)
            old_sum = Path(f"{path}{CHECKSUM_SUFFIX}")
            if old_sum.exists():
                os.replace(old_sum, Path(f"{prev}{CHECKSUM_SUFFIX}"))
        os.replace(tmp, path)
        os.replace(tmp_sum, Path(f"{path}{CHECKSUM_SUFFIX}"))
    except BaseException:
        tmp.unlink(missing_ok=True)
        tmp_sum.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return digest


def recorded_sha256(path: Path) -> str | None:
    """The sha256 recorded beside a checkpoint, or None when there is no sidecar."""
    side = Path(f"{path}{CHECKSUM_SUFFIX}")
    if not side.exists():
        return None
    text = side.read_text().split()
    return text[0] if text else None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint safely (weights_only=True), first checking it against its recorded sha256."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if verify:
        expected = recorded_sha256(path)
        if expected is None:
            raise CheckpointError(f"checkpoint {path} has no {CHECKSUM_SUFFIX} file to verify it against")
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointError(
                f"checkpoint {path} is corrupt or truncated: sha256 {actual[:12]}… != recorded {expected[:12]}…"
            )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for unreadable or unsafe files
        raise CheckpointError(f"checkpoint {path} cannot be read safely: {exc}") from exc
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{path} is not a checkpoint written by itrd")
    return state


def latest_valid_checkpoint(directory: Path, name: str = "last.pt") -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in `directory` that verifies: `last.pt`, else `last.prev.pt`; None if none.

    Raises CheckpointError when checkpoints exist but none of them verifies, so that a corrupt run is
    never silently restarted from scratch.
    """
    primary = directory / name
    errors: list[str] = []
    for candidate in (primary, _previous(primary)):
        if not candidate.exists():
            continue
        try:
            return candidate, load_checkpoint(candidate)
        except CheckpointError as exc:
            errors.append(str(exc))
    if errors:
        raise CheckpointError("no usable checkpoint: " + "; ".join(errors))
    return None
