"""Per-token rate limiting as Salesmsg does it: N requests in a rolling minute,
then 429 for the next 60 seconds. No rate-limit headers."""

from __future__ import annotations

import threading
from collections import deque

WINDOW = 60.0
LOCKOUT = 60.0


class RateLimiter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hits: dict[str, deque[float]] = {}
        self._blocked_until: dict[str, float] = {}

    def allow(self, key: str, limit: int, now: float) -> bool:
        """Record a request for ``key`` at ``now``; False when it must get a 429. ``limit`` 0 = off."""
        if limit <= 0:
            return True
        with self._lock:
            if self._blocked_until.get(key, 0.0) > now:
                return False
            hits = self._hits.setdefault(key, deque())
            while hits and hits[0] <= now - WINDOW:
                hits.popleft()
            if len(hits) >= limit:
                self._blocked_until[key] = now + LOCKOUT
                hits.clear()
                return False
            hits.append(now)
            return True

    def reset(self) -> None:
        with self._lock:
            self._hits.clear()
            self._blocked_until.clear()
