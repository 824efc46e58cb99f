"""Structured logs: one JSON object a line, carrying the request id that follows a job into its worker.

The API takes `X-Request-ID` from the client (or makes one), answers with it, and stores it on the job
it creates; the worker that runs the job logs under the same id, so one grep finds a job's whole story.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)


def new_request_id() -> str:
    """A fresh request id."""
    return uuid.uuid4().hex


def clean_request_id(value: str | None) -> str:
    """A client's X-Request-ID if it is a sane token (at most 64 of [A-Za-z0-9._-]), else a new one."""
    if value and len(value) <= 64 and all(c.isalnum() or c in "._-" for c in value):
        return value
    return new_request_id()


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line with time, level, logger, message and the context ids."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, var in (("request_id", request_id), ("job_id", job_id)):
            value = getattr(record, key, None) or var.get()
            if value:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str | None = None, fmt: str | None = None) -> None:
    """Send the root logger's records to stderr: JSON lines (default) or plain text (`ITRD_LOG_FORMAT=text`)."""
    fmt = fmt or os.environ.get("ITRD_LOG_FORMAT", "json")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("ITRD_LOG_LEVEL", "INFO"))
