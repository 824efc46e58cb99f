"""Dependencies the routes declare: settings, a database session, the artifact store, the caller and its limits."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service import keys
from service.api.problems import Problem
from service.config import Settings
from service.db import get_engine
from service.idempotency import IdempotencyClaim, check_key, request_hash
from service.jobs import Rejected
from service.models import ApiKey
from service.ratelimit import Limiter
from service.storage import ArtifactStore


def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """A session for one request; whatever it did not commit is rolled back when it closes."""
    with Session(get_engine(settings.database_url), expire_on_commit=False) as session:
        yield session


def get_store(request: Request) -> ArtifactStore:
    """The artifact store the app was created with."""
    store: ArtifactStore = request.app.state.store
    return store


SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]

_bearer = HTTPBearer(auto_error=False, description="an API key, made with `itrd keys create OWNER`")
_REALM = 'Bearer realm="itrd"'


def current_key(
    session: SessionDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> ApiKey:
    """The caller's API key from `Authorization: Bearer <key>`; 401 when it is missing, unknown or revoked."""
    if credentials is None:
        raise Problem(401, "this endpoint needs an API key: send 'Authorization: Bearer <key>' "
                      "(an operator makes one with `itrd keys create OWNER`)", "unauthorized",
                      headers={"WWW-Authenticate": _REALM})
    row = keys.authenticate(session, credentials.credentials)
    if row is None:
        raise Problem(401, "the API key is unknown or revoked: ask for a new one", "unauthorized",
                      headers={"WWW-Authenticate": f'{_REALM}, error="invalid_token"'})
    return row


CurrentKey = Annotated[ApiKey, Depends(current_key)]


def current_owner(key: CurrentKey) -> str:
    """Who is calling: the owner of the API key; every record the caller reaches is one of theirs."""
    return key.owner


CurrentOwner = Annotated[str, Depends(current_owner)]


def limit_submissions(request: Request, key: CurrentKey) -> None:
    """Count a submission against the key's rate; 429 with Retry-After past the limit."""
    limiter: Limiter = request.app.state.submit_limiter
    wait = limiter.hit(key.id)
    if wait is not None:
        raise Problem(429, f"this key made {limiter.limit} submissions in the last minute, the most allowed "
                      f"(ITRD_SUBMIT_RATE_PER_MINUTE); retry in {wait} s", "rate-limited",
                      headers={"Retry-After": str(wait)})


SubmitLimit = Depends(limit_submissions)
IdempotencyKeyHeader = Annotated[str | None, Header(
    alias="Idempotency-Key", description="repeat a request with the same key to get the original answer")]


def idempotency_claim(owner: str, scope: str, key: str | None, *parts: object) -> IdempotencyClaim | None:
    """The claim of a request that sent an Idempotency-Key (None if it sent none); 422 for a bad key."""
    if key is None:
        return None
    try:
        check_key(key)
    except ValueError as exc:
        raise Rejected(("header", "Idempotency-Key"), str(exc)) from exc
    return IdempotencyClaim(owner=owner, scope=scope, key=key, request_hash=request_hash(scope, *parts))
