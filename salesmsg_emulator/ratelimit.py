"""Rate limiting as Salesmsg describes it: about N requests a minute "across the API", then 429
for the next 60 seconds, with no rate-limit headers.

A budget is a rolling minute of requests under one key. What shares a key is the
``rate_limit_scope`` setting (``budget_key``); the lockout is fixed (calls made during it
neither count nor extend it) unless ``rate_limit_lockout_extends``. When a lockout ends the
budget starts empty.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from salesmsg_emulator.records import AccessToken
from salesmsg_emulator.state import Store

WINDOW = 60.0
LOCKOUT = 60.0


def budget_key(store: Store, token: AccessToken, scope: str) -> str:
    """The budget a request with ``token`` counts against; never changes when the token is refreshed.

    - ``org``: the token's org.
    - ``app``: the OAuth client of the token's grant; a PAT belongs to no client and counts as its
      user's own app (the PAT, every replacement of it and every other PAT of that user).
    - ``token``: one authorization: the OAuth grant (every access token refreshed from one code),
      or a PAT with its replacements.
    """
    if scope == "app":
        grant = store.grants.get(token.grant_id) if token.grant_id else None
        return f"app:{grant.client_id}" if grant is not None else f"pat-user:{token.user_id}"
    if scope == "token":
        return f"grant:{token.grant_id}" if token.grant_id else f"pat:{token.family or token.jti}"
    return f"org:{token.org_id}"


class RateLimiter:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hits: dict[str, deque[float]] = {}
        self._blocked_until: dict[str, float] = {}

    def allow(self, key: str, limit: int, now: float, *, extend_lockout: bool = False) -> bool:
        """Record a request for ``key`` at ``now``; False when it must get a 429. ``limit`` 0 = off."""
        if limit <= 0:
            return True
        with self._lock:
            if self._blocked_until.get(key, 0.0) > now:
                if extend_lockout:
                    self._blocked_until[key] = now + LOCKOUT
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

    def snapshot(self, now: float) -> dict[str, dict[str, Any]]:
        """Every budget: requests in the current window and the end of a lockout in force (or None)."""
        with self._lock:
            keys = sorted(set(self._hits) | set(self._blocked_until))
            return {
                key: {
                    "in_window": sum(1 for t in self._hits.get(key, ()) if t > now - WINDOW),
                    "blocked_until": until if (until := self._blocked_until.get(key, 0.0)) > now else None,
                }
                for key in keys
            }

    def reset(self) -> None:
        with self._lock:
            self._hits.clear()
            self._blocked_until.clear()
