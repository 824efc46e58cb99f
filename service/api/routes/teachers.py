"""Uploaded teachers: send a trained teacher's weights once, then distil from it by id."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.types import Message

from service import teachers
from service.api.deps import (
    CurrentOwner,
    IdempotencyKeyHeader,
    SessionDep,
    SettingsDep,
    StoreDep,
    SubmitLimit,
    idempotency_claim,
)
from service.api.problems import problem_responses
from service.idempotency import create_once
from service.schemas import TeacherPublic, TeachersPublic
from service.storage import CHUNK_SIZE

# Room for the multipart framing and the small form fields beside the file itself.
FORM_OVERHEAD = 64 * 1024


class UploadLimitRoute(APIRoute):
    """A route that refuses a request body past the upload limit while it streams in (HTTP 413).

    Counting the bytes as they arrive stops an oversized upload before the form parser spools all of
    it to disk; the file part itself is held to the exact limit when it is copied.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """The normal handler, reading the body through a byte counter."""
        handler = super().get_route_handler()

        async def limited(request: Request) -> Response:
            limit = request.app.state.settings.upload_max_bytes + FORM_OVERHEAD
            too_large = HTTPException(413, f"the request body exceeds {limit} bytes (ITRD_UPLOAD_MAX_BYTES)")
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise too_large
            received = 0

            async def receive() -> Message:
                nonlocal received
                message = await request.receive()
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large
                return message

            return await handler(Request(request.scope, receive))

        return limited


router = APIRouter(prefix="/teachers", tags=["teachers"], route_class=UploadLimitRoute,
                   responses=problem_responses(401))


def _file_sha256(file: UploadFile) -> str:
    """The sha256 of an upload's bytes, leaving the file at its start for the real read."""
    digest = hashlib.sha256()
    file.file.seek(0)
    while chunk := file.file.read(CHUNK_SIZE):
        digest.update(chunk)
    file.file.seek(0)
    return digest.hexdigest()


@router.post("", status_code=201, response_model=TeacherPublic, dependencies=[SubmitLimit],
             responses=problem_responses(409, 429))
def upload_teacher(
    architecture: Annotated[str, Form(description="a name from GET /v1/models")],
    num_classes: Annotated[int, Form(ge=1, le=100_000)],
    file: Annotated[UploadFile, File(description="a state dict: .safetensors, or torch.save(model.state_dict())")],
    session: SessionDep, store: StoreDep, settings: SettingsDep, owner: CurrentOwner,
    request: Request, response: Response, idempotency_key: IdempotencyKeyHeader = None,
) -> TeacherPublic:
    """Upload teacher weights; they are loaded safely and strictly, then kept as safetensors.

    A repeat with the same Idempotency-Key, fields and file answers with the teacher the first one stored.
    """
    claim = (idempotency_claim(owner, "teachers", idempotency_key, architecture, num_classes, _file_sha256(file))
             if idempotency_key is not None else None)
    row, replayed = create_once(
        session, claim,
        lambda c: teachers.store_teacher(session, store, settings, architecture=architecture,
                                         num_classes=num_classes, source=file.file, owner=owner, idempotency=c),
        lambda upload_id: teachers.get_teacher(session, upload_id, owner))
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = str(request.url_for("get_teacher", upload_id=row.id))
    return TeacherPublic.from_row(row)


@router.get("", response_model=TeachersPublic)
def list_teachers(
    session: SessionDep, owner: CurrentOwner,
    limit: Annotated[int, Query(ge=1, le=100)] = 20, offset: Annotated[int, Query(ge=0)] = 0,
) -> TeachersPublic:
    """Uploaded teachers, newest first."""
    rows, total = teachers.list_teachers(session, owner=owner, limit=limit, offset=offset)
    return TeachersPublic(items=[TeacherPublic.from_row(r) for r in rows], total=total)


@router.get("/{upload_id}", response_model=TeacherPublic)
def get_teacher(upload_id: str, session: SessionDep, owner: CurrentOwner) -> TeacherPublic:
    """One uploaded teacher."""
    return TeacherPublic.from_row(teachers.get_teacher(session, upload_id, owner))
