"""A sliding-window limit on submissions per API key, held in the API process.

In process on purpose: it needs no table and no round trip. With several API processes each one
counts on its own, so the effective limit is the setting times the number of processes.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

WINDOW_SECONDS = 60.0


class SlidingWindowLimiter:
    """At most `limit` events per `window` seconds per key; `hit` says how long to wait when over."""

    def __init__(self, limit: int, window: float = WINDOW_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window, self.clock = limit, window, clock
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str) -> int | None:
        """Count one event for `key`: None if allowed, else the whole seconds until one would be."""
        now = self.clock()
        with self._lock:
            events = self._events.setdefault(key, deque())
            while events and events[0] <= now - self.window:
                events.popleft()
            if len(events) >= self.limit:
                return max(1, math.ceil(events[0] + self.window - now))
            events.append(now)
            return None
