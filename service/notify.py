"""Job-end notifications: a signed POST to the spec's `callback_url`, delivered from an outbox.

Ending a job writes a `callback_deliveries` row in the same transaction (service.states), so the
callback is owed exactly when the end is recorded, whoever ends the job and whatever happens to that
process next. `deliver_due` sends due rows, each under a short lease so two processes never send one
row at once, and schedules a failed attempt again with exponential back-off (1 s doubling, 13
attempts over about 68 minutes) before marking it failed. The process that ended the job starts a
sender at once (`kick`); every reaper round sends whatever is still due, so a sender that died is
replaced. Delivery is at least once: `X-ITRD-Delivery` (stable across retries) lets a receiver
drop duplicates.

The body is the job's public JSON. The signature is `X-ITRD-Signature: sha256=<hex>`, the HMAC-SHA256
of `<timestamp>.<body>` under the service's callback secret, with the timestamp in
`X-ITRD-Timestamp`, so a receiver can reject forgeries and replays. The secret is `ITRD_SECRET_KEY`,
or (embedded mode) a random one kept in `$ITRD_STATE_DIR/callback_secret`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.engine import Engine

from service.config import Settings, get_settings
from service.db import session_scope
from service.models import CallbackDelivery, Job, utcnow

log = logging.getLogger(__name__)
# Seconds to wait after the n-th failed attempt; after the last one the delivery is marked failed.
BACKOFF = tuple(float(2**n) for n in range(12))
MAX_ATTEMPTS = len(BACKOFF) + 1
POST_TIMEOUT = 10.0
LEASE = timedelta(seconds=60)  # well over one POST: a leased row is being sent, or its sender died


def callback_secret(settings: Settings) -> bytes:
    """The key callbacks are signed with (made once per state dir when no ITRD_SECRET_KEY is set)."""
    if settings.secret_key is not None and settings.secret_key.get_secret_value():
        return settings.secret_key.get_secret_value().encode()
    path = settings.state_dir / "callback_secret"
    if not path.exists():
        # Written whole under a private name, then linked into place: of processes or threads making it
        # at once, one wins and every one of them reads that same complete secret.
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".callback_secret.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return path.read_text().strip().encode()


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The signature header's value for a body sent at `timestamp`."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def post_once(url: str, body: bytes, secret: bytes, *, delivery_id: str, attempt: int) -> str | None:
    """POST one signed body; None when the receiver answered 2xx, else what went wrong."""
    timestamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "X-ITRD-Timestamp": timestamp,
               "X-ITRD-Signature": sign(secret, timestamp, body), "X-ITRD-Delivery": delivery_id,
               "X-ITRD-Delivery-Attempt": str(attempt)}
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=POST_TIMEOUT)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    if 200 <= response.status_code < 300:
        return None
    return f"answered HTTP {response.status_code}"


def _payload(session: Any, job_id: str) -> bytes:
    from service.schemas import JobPublic

    job = session.get(Job, job_id)
    # The receiver gets the job as it ended, not how its own delivery is going.
    return JobPublic.from_job(job).model_dump_json(exclude={"callback"}).encode()


def deliver_due(engine: Engine, settings: Settings | None = None, *, now: datetime | None = None,
                limit: int = 50) -> list[str]:
    """Send every callback that is due and not leased by another sender; returns the job ids delivered."""
    s = settings or get_settings()
    # `now` fixes the clock (tests jump it forward); otherwise each lease is taken at the current time,
    # so a long round with slow receivers never leases a row for less than LEASE.
    clock = (lambda: now) if now is not None else utcnow

    def free(at: datetime) -> ColumnElement[bool]:
        return or_(CallbackDelivery.lease_until.is_(None), CallbackDelivery.lease_until < at)

    start = clock()
    with session_scope(engine) as session:
        due = list(session.scalars(
            select(CallbackDelivery.id)
            .where(CallbackDelivery.state == "pending", CallbackDelivery.next_attempt_at <= start, free(start))
            .order_by(CallbackDelivery.next_attempt_at).limit(limit)))
    delivered: list[str] = []
    secret = callback_secret(s) if due else b""
    for row_id in due:
        at = clock()
        with session_scope(engine) as session:
            taken = session.execute(
                update(CallbackDelivery)
                .where(CallbackDelivery.id == row_id, CallbackDelivery.state == "pending", free(at))
                .values(lease_until=at + LEASE, attempts=CallbackDelivery.attempts + 1)
                .returning(CallbackDelivery.job_id, CallbackDelivery.url, CallbackDelivery.attempts)
            ).first()
            if taken is None:
                continue  # another sender took it first
            job_id, url, attempt = taken
            body = _payload(session, job_id)
        error = post_once(url, body, secret, delivery_id=f"{job_id}-{row_id}", attempt=attempt)
        ended = utcnow()
        values: dict[str, Any] = {"lease_until": None, "last_error": error}
        if error is None:
            values.update(state="delivered", delivered_at=ended)
            delivered.append(job_id)
        elif attempt >= MAX_ATTEMPTS:
            values["state"] = "failed"
            log.error("callback for job %s to %s failed for good after %d attempts: %s", job_id, url, attempt, error)
        else:
            values["next_attempt_at"] = ended + timedelta(seconds=BACKOFF[attempt - 1])
            log.warning("callback for job %s to %s: %s (attempt %d of %d)", job_id, url, error, attempt, MAX_ATTEMPTS)
        with session_scope(engine) as session:
            session.execute(update(CallbackDelivery).where(CallbackDelivery.id == row_id).values(**values))
    return delivered


class _Sender:
    """At most one sending thread per database in this process; a kick while it runs makes it go again."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.threads: dict[str, threading.Thread] = {}
        self.again: set[str] = set()

    def kick(self, engine: Engine, settings: Settings) -> threading.Thread:
        key = engine.url.render_as_string(hide_password=False)
        with self.lock:
            running = self.threads.get(key)
            if running is not None and running.is_alive():
                self.again.add(key)
                return running
            thread = threading.Thread(target=self._loop, args=(key, engine, settings), name="itrd-callbacks",
                                      daemon=True)
            self.threads[key] = thread
            thread.start()
            return thread

    def _loop(self, key: str, engine: Engine, settings: Settings) -> None:
        while True:
            try:
                deliver_due(engine, settings)
            except Exception as exc:  # database down: the reaper's next round kicks again
                log.warning("callback sender failed: %s", exc)
            with self.lock:
                if key not in self.again:
                    self.threads.pop(key, None)
                    return
                self.again.discard(key)


_sender = _Sender()


def kick(engine: Engine, settings: Settings | None = None) -> threading.Thread:
    """Send due callbacks now, in this process's sender thread (started if none is running)."""
    return _sender.kick(engine, settings or get_settings())
