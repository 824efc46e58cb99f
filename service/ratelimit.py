"""Sliding-window limits on submissions per API key: shared through Redis, or held in the process.

With a Redis broker (every distributed deployment) the window lives in Redis, one sorted set per key
updated by one Lua script, so all API replicas count together and the time is Redis's own clock (no
skew between replicas). In embedded mode (one API process, no Redis) it is held in the process.
If Redis stops answering, the limit falls back to the process's own count rather than refusing
submits: the database, not Redis, is what a submit needs.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import redis

log = logging.getLogger(__name__)
WINDOW_SECONDS = 60.0


class Limiter(Protocol):
    """At most `limit` events per window per key."""

    limit: int

    def hit(self, key: str) -> int | None:
        """Count one event for `key`: None if allowed, else the whole seconds until one would be."""


class SlidingWindowLimiter:
    """At most `limit` events per `window` seconds per key, counted in this process."""

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


# KEYS[1]: the key's sorted set; ARGV: window (s), limit, a unique member. Returns -1 when allowed,
# else the milliseconds until the oldest event leaves the window. Atomic: Redis runs scripts alone.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1]) * 1000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(1, tonumber(oldest[2]) + window - now)
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window)
return -1
"""


class RedisWindowLimiter:
    """The same sliding window, kept in Redis so that every API process shares it."""

    def __init__(self, url: str, limit: int, window: float = WINDOW_SECONDS, *, prefix: str = "itrd:submits:",
                 timeout: float = 0.5) -> None:
        self.limit, self.window, self.prefix = limit, window, prefix
        self._redis = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._script = self._redis.register_script(_SCRIPT)
        self._fallback = SlidingWindowLimiter(limit, window)
        self._warned = False

    def hit(self, key: str) -> int | None:
        """Count one event for `key` in Redis (in this process while Redis does not answer)."""
        try:
            wait_ms = int(self._script(keys=[self.prefix + key], args=[self.window, self.limit, secrets.token_hex(8)]))
        except redis.RedisError as exc:
            if not self._warned:
                log.warning("rate limit: Redis did not answer (%s); counting in this process until it does", exc)
                self._warned = True
            return self._fallback.hit(key)
        self._warned = False
        return None if wait_ms < 0 else max(1, math.ceil(wait_ms / 1000))


def limiter_for(broker_url: str, limit: int) -> Limiter:
    """The shared Redis limiter when the broker is Redis, else the in-process one."""
    if broker_url.startswith(("redis://", "rediss://")):
        return RedisWindowLimiter(broker_url, limit)
    return SlidingWindowLimiter(limit)
