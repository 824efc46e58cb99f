"""HTTP request counts and latencies, kept in process and written in Prometheus' text format.

A small registry of our own: the service needs two counters and one histogram, which does not
justify a dependency. Requests are labelled by route template (`/v1/jobs/{job_id}`), never by the
raw path, so that the number of series stays bounded.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Seconds; the slowest bucket catches long downloads and event streams.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

Labels = tuple[str, str, str]  # method, route, status


def escape_label(value: str) -> str:
    """A label value escaped as the text exposition format wants (backslash, quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    total: float = 0.0
    n: int = 0


class HttpStats:
    """Request counts and a latency histogram per (method, route, status); safe across threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latency: dict[Labels, _Histogram] = defaultdict(_Histogram)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one finished request."""
        with self._lock:
            h = self._latency[(method, route, str(status))]
            index = bisect.bisect_left(BUCKETS, seconds)
            if index < len(BUCKETS):
                h.counts[index] += 1
            h.total += seconds
            h.n += 1

    def exposition(self) -> list[str]:
        """The lines of itrd_http_requests_total and itrd_http_request_duration_seconds."""
        with self._lock:
            items = sorted((k, _Histogram(list(v.counts), v.total, v.n)) for k, v in self._latency.items())
        lines = ["# HELP itrd_http_requests_total HTTP requests answered, by method, route and status.",
                 "# TYPE itrd_http_requests_total counter"]
        for (method, route, status), h in items:
            lines.append(f'itrd_http_requests_total{{{_labels(method, route, status)}}} {h.n}')
        lines += ["# HELP itrd_http_request_duration_seconds Time to answer an HTTP request (to its last byte).",
                  "# TYPE itrd_http_request_duration_seconds histogram"]
        for (method, route, status), h in items:
            labels = _labels(method, route, status)
            cumulative = 0
            for bound, count in zip(BUCKETS, h.counts, strict=True):
                cumulative += count
                lines.append(f'itrd_http_request_duration_seconds_bucket{{{labels},le="{bound}"}} {cumulative}')
            lines.append(f'itrd_http_request_duration_seconds_bucket{{{labels},le="+Inf"}} {h.n}')
            lines.append(f"itrd_http_request_duration_seconds_sum{{{labels}}} {h.total:.6f}")
            lines.append(f"itrd_http_request_duration_seconds_count{{{labels}}} {h.n}")
        return lines


def _labels(method: str, route: str, status: str) -> str:
    return f'method="{escape_label(method)}",route="{escape_label(route)}",status="{status}"'


class HttpMetricsMiddleware:
    """ASGI middleware that times every HTTP request into an HttpStats (streams are timed to their end)."""

    def __init__(self, app: ASGIApp, stats: HttpStats) -> None:
        self.app, self.stats = app, stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, noting its status, and record it when the response is done."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def noting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        finally:
            self.stats.observe(scope["method"], route_template(scope), status, time.perf_counter() - start)


def route_template(scope: Scope) -> str:
    """The matched route's path with its parameters named (`/v1/jobs/{job_id}`); "unmatched" if none matched.

    Rebuilt from the path and the path parameters the router extracted, because FastAPI keeps included
    routers nested and the matched route object knows only its path within its router.
    """
    if "endpoint" not in scope and "route" not in scope:
        # Unmatched paths share one label: a scanner must not create a series per URL it tries.
        return "unmatched"
    names = {str(value): f"{{{name}}}" for name, value in (scope.get("path_params") or {}).items()}
    return "/".join(names.get(segment, segment) for segment in str(scope["path"]).split("/"))
