"""API keys: made for an owner, shown once, stored only as a sha256, found again by a public prefix.

A key reads `itrd_<prefix>_<secret>`: the 12-hex-digit prefix finds the row without a scan, and the
secret (256 random bits) is what the hash guards. 256 bits leave nothing for a slow password hash to
add, so one sha256 is enough, compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import ApiKey, utcnow

KEY_PREFIX = "itrd_"
_PREFIX_HEX = 12


class KeyNotFound(LookupError):
    """No API key with that id."""


def hash_key(key: str) -> str:
    """The sha256 (hex) of a whole key: the only form of it the database holds."""
    return hashlib.sha256(key.encode()).hexdigest()


def _split(key: str) -> str | None:
    """The lookup prefix of a well-formed key, or None."""
    if not key.startswith(KEY_PREFIX):
        return None
    prefix, _, secret = key.removeprefix(KEY_PREFIX).partition("_")
    if len(prefix) != _PREFIX_HEX or not secret:
        return None
    return prefix


def create_key(session: Session, owner: str, name: str | None = None) -> tuple[ApiKey, str]:
    """Make and commit a key for `owner`; returns its row and the key itself (never retrievable again)."""
    owner = owner.strip()
    if not owner or len(owner) > 128:
        raise ValueError("an owner is a name of 1 to 128 characters")
    prefix = secrets.token_hex(_PREFIX_HEX // 2)
    key = f"{KEY_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiKey(owner=owner, name=name, prefix=prefix, key_hash=hash_key(key))
    session.add(row)
    session.commit()
    return row, key


def authenticate(session: Session, key: str) -> ApiKey | None:
    """The live (unrevoked) key row that `key` is, or None."""
    prefix = _split(key)
    if prefix is None:
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.key_hash, hash_key(key)):
        return None
    return row


def revoke_key(session: Session, key_id: str) -> ApiKey:
    """Revoke a key from now on (revoking twice keeps the first time) and commit; raises KeyNotFound."""
    row = session.get(ApiKey, key_id)
    if row is None:
        raise KeyNotFound(f"API key {key_id} does not exist")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row


def list_keys(session: Session, owner: str | None = None) -> Sequence[ApiKey]:
    """Keys (all, or one owner's), oldest first."""
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if owner is not None:
        query = query.where(ApiKey.owner == owner)
    return list(session.scalars(query))
