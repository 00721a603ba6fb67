"""Rate limits per API key and per tenant, with the ``limits`` library.

In process (moving window in memory) by default; shared by every process through Redis when
``SMC_REDIS_URL`` is set. A refused call gets 429 with ``Retry-After`` in seconds.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

from app.settings import Settings


class RateLimits:
    def __init__(self, settings: Settings) -> None:
        storage: Storage
        if settings.redis_url:
            url = settings.redis_url
            storage = RedisStorage(url if url.startswith("async+") else f"async+{url}", implementation="redispy")
        else:
            storage = MemoryStorage()
        self.storage = storage
        self.limiter = MovingWindowRateLimiter(storage)
        self.per_key: RateLimitItem = parse(settings.rate_limit_per_key)
        self.per_tenant: RateLimitItem = parse(settings.rate_limit_per_tenant)

    async def check(self, *, key_id: str, tenant_id: str) -> int | None:
        """None when the call may go; otherwise the seconds to wait."""
        if not await self.limiter.hit(self.per_key, "key", key_id):
            return await self._wait(self.per_key, "key", key_id)
        if not await self.limiter.hit(self.per_tenant, "tenant", tenant_id):
            return await self._wait(self.per_tenant, "tenant", tenant_id)
        return None

    async def _wait(self, item: RateLimitItem, *identifiers: str) -> int:
        stats = await self.limiter.get_window_stats(item, *identifiers)
        return max(1, math.ceil(stats.reset_time - time.time()))

    async def close(self) -> None:
        reset = getattr(self.storage, "reset", None)
        if isinstance(self.storage, MemoryStorage) and reset is not None:
            await reset()
