"""Idempotent submits: an `Idempotency-Key` maps an owner's retried request to the resource it made.

The record is inserted in the same transaction as the resource. Two concurrent requests with one key
both try the insert; the unique constraint lets one commit and makes the other fail (on PostgreSQL it
waits for the first to commit), and the loser then answers with the winner's resource.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.models import IdempotencyRecord

MAX_KEY_LENGTH = 255


class IdempotencyKeyReused(ValueError):
    """The key was used before by this owner for a different request (HTTP 422)."""


class IdempotencyRace(Exception):
    """Another request with the same key committed first; ask `find` for its resource."""


class IdempotencyConflict(Exception):
    """A concurrent request with the same key lost its work before recording it (HTTP 409: retry)."""


T = TypeVar("T")


@dataclass(frozen=True)
class IdempotencyClaim:
    """One request's idempotency key, scoped to its owner and endpoint, with the hash of what it asks."""

    owner: str
    scope: str
    key: str
    request_hash: str

    def find(self, session: Session) -> str | None:
        """The id of the resource an earlier identical request made, None if the key is new.

        Raises IdempotencyKeyReused when the key was used for a different request.
        """
        row = session.scalar(select(IdempotencyRecord).where(
            IdempotencyRecord.owner == self.owner, IdempotencyRecord.scope == self.scope,
            IdempotencyRecord.key == self.key))
        if row is None:
            return None
        if row.request_hash != self.request_hash:
            raise IdempotencyKeyReused(
                f"Idempotency-Key {self.key!r} was already used with a different request; "
                "send a new key for a new request, or repeat the original request exactly")
        return row.resource_id

    def record(self, session: Session, resource_id: str) -> None:
        """Add the record in the caller's transaction; raises IdempotencyRace if another request has it."""
        session.add(IdempotencyRecord(owner=self.owner, scope=self.scope, key=self.key,
                                      request_hash=self.request_hash, resource_id=resource_id))
        try:
            session.flush()
        except IntegrityError as exc:
            session.rollback()
            raise IdempotencyRace(self.key) from exc


def create_once(session: Session, claim: IdempotencyClaim | None, create: Callable[[IdempotencyClaim | None], T],
                fetch: Callable[[str], T]) -> tuple[T, bool]:
    """(the resource, whether it is a replay): `create(claim)` it, or `fetch` what the key made before."""
    if claim is None:
        return create(None), False
    earlier = claim.find(session)
    if earlier is None:
        try:
            return create(claim), False
        except IdempotencyRace:
            earlier = claim.find(session)
            if earlier is None:
                raise IdempotencyConflict(
                    f"a concurrent request with Idempotency-Key {claim.key!r} did not finish; retry") from None
    return fetch(earlier), True


def request_hash(*parts: Any) -> str:
    """A stable sha256 of JSON-able request parts (dict keys sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_key(key: str) -> str:
    """The header's key if usable, else ValueError saying what is wrong."""
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise ValueError(f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable characters")
    return key
