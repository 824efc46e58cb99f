"""Errors as RFC 9457 problem details (`application/problem+json`), for every failure the API reports."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from itrd.engine.weights import WeightsError
from service.idempotency import IdempotencyConflict, IdempotencyKeyReused
from service.jobs import Rejected, TeacherNotFound
from service.states import InvalidTransition, JobAlreadyEnded, JobNotFound, TeacherNotUsable
from service.storage import ArtifactNotFound, InvalidArtifactName
from service.teachers import UploadTooLarge

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:itrd:problem:"

# Domain errors and how they read over HTTP: (status, problem type slug).
DOMAIN_ERRORS: dict[type[Exception], tuple[int, str]] = {
    JobNotFound: (404, "job-not-found"),
    TeacherNotFound: (404, "teacher-not-found"),
    ArtifactNotFound: (404, "artifact-not-found"),
    InvalidArtifactName: (404, "artifact-not-found"),
    JobAlreadyEnded: (409, "job-already-ended"),
    UploadTooLarge: (413, "upload-too-large"),
    InvalidTransition: (409, "invalid-transition"),
    TeacherNotUsable: (422, "teacher-not-usable"),
    WeightsError: (422, "bad-weights"),
    IdempotencyKeyReused: (422, "idempotency-key-reused"),
    IdempotencyConflict: (409, "idempotency-conflict"),
}


_PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {"type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                   "detail": {"type": "string"}, "instance": {"type": "string"}},
    "additionalProperties": True,
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries declaring problem+json answers with these statuses."""
    return {status: {"description": HTTPStatus(status).phrase, "content": {PROBLEM_JSON: {"schema": _PROBLEM_SCHEMA}}}
            for status in statuses}


class Problem(Exception):
    """An error the API answers with as it stands: status, a type slug, a detail and extension members."""

    def __init__(self, status: int, detail: str, slug: str | None = None, headers: dict[str, str] | None = None,
                 **extensions: Any) -> None:
        super().__init__(detail)
        self.status, self.detail, self.slug = status, detail, slug
        self.headers = headers
        self.extensions = extensions


def problem_response(request: Request, status: int, detail: str, slug: str | None = None,
                     headers: dict[str, str] | None = None, **extensions: Any) -> JSONResponse:
    """A problem+json response; `slug` names a type of our own, else the type is about:blank."""
    body: dict[str, Any] = {
        "type": TYPE_PREFIX + slug if slug else "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        **extensions,
    }
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return problem_response(request, exc.status_code, detail, headers=dict(exc.headers or {}))


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Only loc, msg and type: `input` may echo a whole upload and `ctx` may hold exception objects.
    errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
              for e in exc.errors()]
    summary = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:3])
    detail = f"{len(errors)} invalid field(s): {summary}" if errors else "invalid request"
    return problem_response(request, 422, detail, "validation", errors=errors)


def _rejected(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Rejected)
    errors = [{"loc": list(exc.loc), "msg": str(exc), "type": "value_error"}]
    return problem_response(request, 422, str(exc), "validation", errors=errors)


def _problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(request, exc.status, exc.detail, exc.slug, exc.headers, **exc.extensions)


def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    # The most specific registered class wins, as in Starlette's own handler lookup.
    status, slug = next(DOMAIN_ERRORS[cls] for cls in type(exc).__mro__ if cls in DOMAIN_ERRORS)
    return problem_response(request, status, str(exc), slug)


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Not logged here: Starlette re-raises the exception after this answer, and the server logs it.
    return problem_response(request, 500, "internal error; the server log has the details")


def install_problem_handlers(app: FastAPI) -> None:
    """Route every error the app can raise to a problem+json answer."""
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Rejected, _rejected)
    app.add_exception_handler(Problem, _problem)
    for cls in DOMAIN_ERRORS:
        app.add_exception_handler(cls, _domain_error)
    app.add_exception_handler(Exception, _unexpected)


def document_problems(app: FastAPI) -> None:
    """Make the OpenAPI schema say what the API sends: every error answer is problem+json.

    FastAPI documents its validation errors (422) as plain JSON of its own shape; here every 4xx/5xx
    entry carries the problem schema instead, and each operation declares the 404 and 422 it can answer.
    """
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                extra = [422] + ([404] if "{" in path else [])
                for status in extra:
                    responses.setdefault(str(status), {"description": HTTPStatus(status).phrase})
                for code, response in responses.items():
                    if code.isdigit() and int(code) >= 400:
                        response["content"] = {PROBLEM_JSON: {"schema": _PROBLEM_SCHEMA}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
