"""Job-end notifications: a signed POST to the spec's `callback_url`, retried with back-off.

The body is the job's public JSON. The signature is `X-ITRD-Signature: sha256=<hex>`, the HMAC-SHA256
of `<timestamp>.<body>` under the service's callback secret, with the timestamp in
`X-ITRD-Timestamp`, so a receiver can reject forgeries and replays. The secret is `ITRD_SECRET_KEY`,
or (embedded mode) a random one kept in `$ITRD_STATE_DIR/callback_secret`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from typing import Any

import httpx
from sqlalchemy.engine import Engine

from service.config import Settings, get_settings
from service.db import session_scope
from service.models import Job

log = logging.getLogger(__name__)
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def callback_secret(settings: Settings) -> bytes:
    """The key callbacks are signed with (made once per state dir when no ITRD_SECRET_KEY is set)."""
    if settings.secret_key is not None and settings.secret_key.get_secret_value():
        return settings.secret_key.get_secret_value().encode()
    path = settings.state_dir / "callback_secret"
    if not path.exists():
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The signature header's value for a body sent at `timestamp`."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def deliver(url: str, payload: dict[str, Any], secret: bytes, delays: tuple[float, ...] = RETRY_DELAYS) -> bool:
    """POST `payload` to `url` until a 2xx answer or the retries run out; True when delivered."""
    body = json.dumps(payload, default=str, sort_keys=True).encode()
    for attempt, delay in enumerate((0.0, *delays)):
        time.sleep(delay)
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "X-ITRD-Timestamp": timestamp,
                   "X-ITRD-Signature": sign(secret, timestamp, body), "X-ITRD-Delivery-Attempt": str(attempt + 1)}
        try:
            response = httpx.post(url, content=body, headers=headers, timeout=10.0)
            if 200 <= response.status_code < 300:
                return True
            log.warning("callback %s answered %s (attempt %d)", url, response.status_code, attempt + 1)
        except httpx.HTTPError as exc:
            log.warning("callback %s failed: %s (attempt %d)", url, exc, attempt + 1)
    return False


def send_callback(url: str, payload: dict[str, Any], settings: Settings) -> threading.Thread:
    """Deliver one callback in a daemon thread (retries included)."""
    thread = threading.Thread(target=deliver, args=(url, payload, callback_secret(settings)),
                              name=f"callback-{payload.get('id')}", daemon=True)
    thread.start()
    return thread


def notify_job_end(job_id: str, engine: Engine, settings: Settings | None = None, background: bool = True
                   ) -> threading.Thread | None:
    """Send the ended job's callback, if its spec asks for one; in a daemon thread unless told otherwise."""
    from service.schemas import JobPublic

    s = settings or get_settings()
    with session_scope(engine) as session:
        job = session.get(Job, job_id)
        if job is None or not job.spec.get("callback_url"):
            return None
        url = str(job.spec["callback_url"])
        payload = json.loads(JobPublic.from_job(job).model_dump_json())
    if not background:
        deliver(url, payload, callback_secret(s))
        return None
    return send_callback(url, payload, s)
