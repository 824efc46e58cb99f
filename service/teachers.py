"""Uploaded teachers: checked by loading them safely and strictly, then kept as safetensors.

Nothing is stored (no object, no row) unless the file loads without unpickling code and fits the
architecture it claims to be, key for key and shape for shape.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors.torch import save_file
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from itrd.engine.weights import WeightsError, fit_state_dict, read_state_dict
from itrd.models import create_model, model_names
from service.config import Settings
from service.idempotency import IdempotencyClaim
from service.jobs import UPLOAD_WEIGHTS, Rejected, TeacherNotFound, upload_store_id, visible_to
from service.models import TeacherUpload, new_id
from service.storage import CHUNK_SIZE, ArtifactStore

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# torch's weights-only unpickler names the callable a pickle asked for.
_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_UNPICKLER = re.compile(r"WeightsUnpickler error:(.*?)(?:Check the documentation|$)", re.DOTALL)
_MAX_DETAIL = 300


class UploadTooLarge(ValueError):
    """An upload past `settings.upload_max_bytes` (HTTP 413)."""


def _copy_limited(source: BinaryIO, dest: Path, limit: int) -> bytes:
    """Copy `source` to `dest`, refusing past `limit` bytes; returns the file's first bytes."""
    written, head = 0, b""
    with dest.open("wb") as out:
        while chunk := source.read(CHUNK_SIZE):
            written += len(chunk)
            if written > limit:
                raise UploadTooLarge(f"the upload exceeds the limit of {limit} bytes (ITRD_UPLOAD_MAX_BYTES)")
            head = head or chunk[:16]
            out.write(chunk)
    return head


def _read_upload(path: Path) -> dict[str, torch.Tensor]:
    """The upload's tensors; a refusal names what the file wanted to run, minus torch's local advice."""
    try:
        return read_state_dict(path)
    except WeightsError as exc:
        text = _ANSI.sub("", str(exc))
        if found := _GLOBAL.search(text):
            raise WeightsError(
                f"refused: loading this file would call {found.group(1)!r}, and uploads may hold only tensors. "
                "Upload a state dict: safetensors, or torch.save(model.state_dict())"
            ) from exc
        if found := _UNPICKLER.search(text):
            reason = " ".join(found.group(1).split())[:_MAX_DETAIL]
            raise WeightsError(
                "cannot read the upload safely: it is not a safetensors file or a torch.save'd state dict of "
                f"tensors ({reason})"
            ) from exc
        raise WeightsError(text[:_MAX_DETAIL]) from exc


def _is_safetensors(head: bytes) -> bool:
    # A safetensors file opens with an 8-byte header length, then the JSON header's '{'; a torch.save
    # file is a zip ('PK') or a pickle (0x80).
    return len(head) > 8 and head[8:9] == b"{"


def store_teacher(
    session: Session, store: ArtifactStore, settings: Settings, *, architecture: str, num_classes: int,
    source: BinaryIO, owner: str | None = None, idempotency: IdempotencyClaim | None = None,
) -> TeacherUpload:
    """Check an uploaded teacher (safe load, strict fit), store it as safetensors and commit its row.

    With `idempotency`, its record commits with the row, or IdempotencyRace says another request won.
    """
    if architecture not in model_names():
        raise Rejected(("body", "architecture"), f"unknown architecture {architecture!r}; see GET /v1/models")
    scratch = settings.state_dir / "uploads"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as folder:
        raw = Path(folder) / "upload"
        head = _copy_limited(source, raw, settings.upload_max_bytes)
        raw = raw.rename(raw.with_suffix(".safetensors" if _is_safetensors(head) else ".pt"))
        state = _read_upload(raw)
        state = fit_state_dict(create_model(architecture, num_classes), state, architecture, "uploaded")
        converted = Path(folder) / UPLOAD_WEIGHTS
        # Clones: tensors that share storage (tied weights, views) cannot be saved as safetensors.
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in state.items()}, str(converted),
                  metadata={"architecture": architecture, "num_classes": str(num_classes)})
        upload_id = new_id()
        size, sha256 = store.put_file(upload_store_id(upload_id), UPLOAD_WEIGHTS, converted)
    row = TeacherUpload(id=upload_id, architecture=architecture, num_classes=num_classes, size=size,
                        sha256=sha256, storage_key=f"{upload_store_id(upload_id)}/{UPLOAD_WEIGHTS}", owner=owner)
    try:
        session.add(row)
        if idempotency is not None:
            idempotency.record(session, row.id)
        session.commit()
    except BaseException:
        store.delete(upload_store_id(upload_id), UPLOAD_WEIGHTS)
        raise
    return row


def get_teacher(session: Session, upload_id: str, owner: str | None = None) -> TeacherUpload:
    """The uploaded teacher with this id; raises TeacherNotFound."""
    row = session.scalar(select(TeacherUpload).where(TeacherUpload.id == upload_id, visible_to(TeacherUpload, owner)))
    if row is None:
        raise TeacherNotFound(f"uploaded teacher {upload_id} does not exist")
    return row


def list_teachers(
    session: Session, *, owner: str | None = None, limit: int = 20, offset: int = 0
) -> tuple[list[TeacherUpload], int]:
    """A page of uploaded teachers, newest first, and how many there are in all."""
    query = select(TeacherUpload).where(visible_to(TeacherUpload, owner))
    total = int(session.scalar(select(func.count()).select_from(query.subquery())) or 0)
    order = (TeacherUpload.created_at.desc(), TeacherUpload.id.desc())
    return list(session.scalars(query.order_by(*order).offset(offset).limit(limit))), total
