"""Rate limits per API key and per tenant.

In one process by default: GCRA (the generic cell rate algorithm), one float per key or tenant,
no lock and no await, so the proxy's hot path pays a dictionary lookup for it. ``N/minute``
allows a burst of N and then one call every minute/N. Shared by every process through Redis
with the ``limits`` library (moving window) when ``SMC_REDIS_URL`` is set; while Redis cannot be
reached, each process falls back to its own limits (logged) and tries Redis again after 5 s. A
refused call gets 429 with ``Retry-After`` in whole seconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable

from limits import RateLimitItem, parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.exceptions import RedisError

from app.core.logs import get_logger
from app.core.metrics import REDIS_FALLBACK, child
from app.core.settings import Settings

log = get_logger(__name__)

_SLACK = 1e-6  # seconds
REDIS_RETRY_SECONDS = 5.0


class CellRate:
    """GCRA for one limit: ``allow`` answers None (and counts the call) or the seconds to wait."""

    __slots__ = ("item", "interval", "period", "tat", "max_entries")

    def __init__(self, item: RateLimitItem, *, max_entries: int = 200_000) -> None:
        self.item = item
        self.period = float(item.get_expiry())
        self.interval = self.period / item.amount
        self.tat: dict[Hashable, float] = {}  # theoretical arrival time of the next call, per identity
        self.max_entries = max_entries

    def allow(self, identity: Hashable, now: float) -> float | None:
        tat = self.tat.get(identity, now)
        if tat < now:
            tat = now
        new_tat = tat + self.interval
        if new_tat - now > self.period + _SLACK:  # slack: float sums must not cost the N-th call
            return new_tat - now - self.period
        if len(self.tat) >= self.max_entries and identity not in self.tat:
            self._prune(now)
        self.tat[identity] = new_tat
        return None

    def _prune(self, now: float) -> None:
        """Forget identities whose budget is whole again (their entry says nothing). When most
        are still live, the next prune waits until the table has doubled: never O(n) per call."""
        self.tat = {k: v for k, v in self.tat.items() if v > now}
        self.max_entries = max(self.max_entries, 2 * len(self.tat))


class RateLimits:
    """``per_key`` and ``per_tenant`` are the cells of each limit; their ``item`` is the limit."""

    def __init__(self, settings: Settings) -> None:
        self.redis: MovingWindowRateLimiter | None = None
        self.redis_down_until = 0.0
        if settings.redis_url:
            url = settings.redis_url
            # timeouts: a Redis that stops answering must fail fast, for the fallback to take over
            storage = RedisStorage(url if url.startswith("async+") else f"async+{url}", implementation="redispy",
                                   socket_timeout=1, socket_connect_timeout=1)
            self.redis = MovingWindowRateLimiter(storage)
        self.per_key = CellRate(parse(settings.rate_limit_per_key))
        self.per_tenant = CellRate(parse(settings.rate_limit_per_tenant))

    async def check(self, *, key_id: Hashable, tenant_id: Hashable) -> int | None:
        """None when the call may go; otherwise the seconds to wait."""
        if self.redis is not None and time.monotonic() >= self.redis_down_until:
            try:
                shared = await self._check_shared(key_id=key_id, tenant_id=tenant_id)
            except (RedisError, OSError) as exc:
                # Redis is away: limits in this process (each process allows the full limit) rather
                # than refusing every call; Redis is tried again in a few seconds
                if not self.redis_down_until:
                    log.warning("redis unreachable: rate limits are per process until it answers", error=type(exc).__name__)
                    child(REDIS_FALLBACK, "rate_limits").set(1)
                self.redis_down_until = time.monotonic() + REDIS_RETRY_SECONDS
            else:
                if self.redis_down_until:
                    log.warning("redis answers again: rate limits are shared again")
                    child(REDIS_FALLBACK, "rate_limits").set(0)
                    self.redis_down_until = 0.0
                return shared
        now = time.monotonic()
        wait = self.per_key.allow(key_id, now)
        if wait is None:
            wait = self.per_tenant.allow(tenant_id, now)
        return None if wait is None else max(1, math.ceil(wait))

    async def _check_shared(self, *, key_id: Hashable, tenant_id: Hashable) -> int | None:
        assert self.redis is not None
        for item, kind, identity in ((self.per_key.item, "key", str(key_id)), (self.per_tenant.item, "tenant", str(tenant_id))):
            if not await self.redis.hit(item, kind, identity):
                stats = await self.redis.get_window_stats(item, kind, identity)
                return max(1, math.ceil(stats.reset_time - time.time()))
        return None

    async def close(self) -> None:
        self.per_key.tat.clear()
        self.per_tenant.tat.clear()
