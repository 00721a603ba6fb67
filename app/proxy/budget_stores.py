"""Where the budget ledgers live (``app.proxy.budget``): PostgreSQL, or Redis when configured.

Each runs the same ``plan`` on the ledger atomically: PostgreSQL locks the budget's row for the
read and the write; Redis takes the budget's lock (redis-py's, released by a script only by its
holder, lapsing if the holder dies). On SQLite (the embedded demo, one process by design) the ledgers live in the process:
a request's own transaction may hold SQLite's only write lock while it calls Salesmsg.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import SQLAlchemyError

from app.core.db import Database
from app.core.logs import get_logger
from app.core.models import BudgetLedger
from app.core.settings import Settings
from app.proxy.budget import BudgetRules, BudgetStore, BudgetUnavailable, Ledger, Verdict, plan

log = get_logger(__name__)
_T = TypeVar("_T")
_KEEP_SECONDS = 120.0  # a ledger says nothing once its last grant is this old (windows are at most 90 s)
_LOCK_SECONDS = 5.0  # Redis: a ledger's lock lapses this long after a holder died with it
_LOCK_WAIT_SECONDS = 3.0  # ... and a caller waits this long for it before it says the budget is unavailable
Clock = Callable[[], float]


class LocalBudgetStore:
    """In this process only: for SQLite, whose deployments are one process."""

    def __init__(self, *, clock: Clock = time.time) -> None:
        self.ledgers: dict[str, Ledger] = {}
        self.clock = clock

    async def take(self, key: str, *, rules: BudgetRules, caller: str) -> Verdict:
        return plan(self.ledgers.setdefault(key, Ledger()), rules=rules, now=self.clock(), caller=caller)

    async def lock(self, key: str, *, until: float) -> None:
        _locking(until)(self.ledgers.setdefault(key, Ledger()))

    async def read(self, key: str) -> Ledger:
        return self.ledgers.get(key) or Ledger()

    async def close(self) -> None:
        self.ledgers.clear()


class PostgresBudgetStore:
    def __init__(self, db: Database, *, clock: Clock = time.time) -> None:
        self.db = db
        self.clock = clock

    async def _update(self, key: str, change: Callable[[Ledger], tuple[_T, bool]]) -> _T:
        statement = select(BudgetLedger.ledger).where(BudgetLedger.key == key).with_for_update()
        try:
            async with self.db.engine.begin() as conn:
                raw = (await conn.execute(statement)).scalar()
                if raw is None:
                    await conn.execute(insert(BudgetLedger).values(key=key, ledger=Ledger().encode()).on_conflict_do_nothing())
                    raw = (await conn.execute(statement)).scalar_one()
                ledger = Ledger.decode(raw)
                result, changed = change(ledger)  # the row is locked: the clock is read now
                if changed:
                    await conn.execute(update(BudgetLedger).where(BudgetLedger.key == key).values(ledger=ledger.encode()))
        except (SQLAlchemyError, OSError) as exc:
            raise BudgetUnavailable(type(exc).__name__) from exc
        return result

    async def take(self, key: str, *, rules: BudgetRules, caller: str) -> Verdict:
        return await self._update(key, _taking(rules=rules, clock=self.clock, caller=caller))

    async def lock(self, key: str, *, until: float) -> None:
        await self._update(key, _locking(until))

    async def read(self, key: str) -> Ledger:
        try:
            async with self.db.engine.connect() as conn:
                raw = (await conn.execute(select(BudgetLedger.ledger).where(BudgetLedger.key == key))).scalar()
                await conn.rollback()
        except (SQLAlchemyError, OSError) as exc:
            raise BudgetUnavailable(type(exc).__name__) from exc
        return Ledger.decode(raw)

    async def close(self) -> None:
        return None


class RedisBudgetStore:
    """One Redis string per budget (the ledger's JSON), expiring once it says nothing."""

    PREFIX = "smc:budget:"

    def __init__(self, url: str, *, clock: Clock = time.time) -> None:
        self.redis = aioredis.Redis.from_url(url.removeprefix("async+"), socket_timeout=2, socket_connect_timeout=2)
        self.clock = clock

    @staticmethod
    def _ttl(ledger: Ledger) -> int:
        last = max((t for t, _, _ in ledger.slots), default=0.0)
        return max(1, math.ceil(max(last + _KEEP_SECONDS, ledger.tat, ledger.locked_until) - time.time()))

    async def _update(self, key: str, change: Callable[[Ledger], tuple[_T, bool]]) -> _T:
        """Read, decide and write under the budget's Redis lock: a stampede of callers queues on
        the lock instead of racing (optimistic WATCH retries collapse under a hundred at once)."""
        name = self.PREFIX + key
        try:
            async with self.redis.lock(name + ":lock", timeout=_LOCK_SECONDS, sleep=0.002, blocking_timeout=_LOCK_WAIT_SECONDS):
                ledger = Ledger.decode(await self.redis.get(name))
                result, changed = change(ledger)  # the ledger is locked: the clock is read now
                if changed:
                    await self.redis.set(name, ledger.encode(), ex=self._ttl(ledger))
                return result
        except (RedisError, OSError) as exc:  # LockError too: nobody let go of the ledger in time
            raise BudgetUnavailable(type(exc).__name__) from exc

    async def take(self, key: str, *, rules: BudgetRules, caller: str) -> Verdict:
        return await self._update(key, _taking(rules=rules, clock=self.clock, caller=caller))

    async def lock(self, key: str, *, until: float) -> None:
        await self._update(key, _locking(until))

    async def read(self, key: str) -> Ledger:
        try:
            return Ledger.decode(await self.redis.get(self.PREFIX + key))
        except (RedisError, OSError) as exc:
            raise BudgetUnavailable(type(exc).__name__) from exc

    async def close(self) -> None:
        await self.redis.aclose()


def _taking(*, rules: BudgetRules, clock: Clock, caller: str) -> Callable[[Ledger], tuple[Verdict, bool]]:
    def change(ledger: Ledger) -> tuple[Verdict, bool]:
        verdict = plan(ledger, rules=rules, now=clock(), caller=caller)
        return verdict, verdict.at is not None

    return change


def _locking(until: float) -> Callable[[Ledger], tuple[None, bool]]:
    def change(ledger: Ledger) -> tuple[None, bool]:
        ledger.locked_until = max(ledger.locked_until, until)
        return None, True

    return change


class FallbackBudgetStore:
    """Redis first; while it cannot be reached, the database (still shared by every process).

    Chosen over failing closed: the budget's purpose is to keep Salesmsg answering, and the
    database holds it exactly too. Redis is tried again ``retry_seconds`` after it failed (each
    call would otherwise wait for its timeouts). The two ledgers do not know each other's grants,
    so the minute after a switch may spend up to one budget more; a 429 from Salesmsg then locks
    the org out as always."""

    def __init__(self, primary: BudgetStore, fallback: BudgetStore, *, retry_seconds: float = 5.0) -> None:
        self.primary = primary
        self.fallback = fallback
        self.retry_seconds = retry_seconds
        self.down_until = 0.0

    def _store(self) -> BudgetStore:
        return self.primary if time.monotonic() >= self.down_until else self.fallback

    def _failed(self, exc: BudgetUnavailable) -> None:
        if time.monotonic() >= self.down_until:
            log.warning("redis unreachable: budgets are kept in the database until it answers", error=str(exc))
        self.down_until = time.monotonic() + self.retry_seconds

    async def take(self, key: str, *, rules: BudgetRules, caller: str) -> Verdict:
        store = self._store()
        if store is self.primary:
            try:
                return await store.take(key, rules=rules, caller=caller)
            except BudgetUnavailable as exc:
                self._failed(exc)
        return await self.fallback.take(key, rules=rules, caller=caller)

    async def lock(self, key: str, *, until: float) -> None:
        for store in (self.primary, self.fallback):  # both: whichever is asked next must know
            try:
                await store.lock(key, until=until)
            except BudgetUnavailable as exc:
                if store is self.primary:
                    self._failed(exc)
                else:
                    raise

    async def read(self, key: str) -> Ledger:
        store = self._store()
        if store is self.primary:
            try:
                return await store.read(key)
            except BudgetUnavailable as exc:
                self._failed(exc)
        return await self.fallback.read(key)

    async def close(self) -> None:
        await self.primary.close()
        await self.fallback.close()


def budget_store(settings: Settings, db: Database) -> BudgetStore:
    local: BudgetStore = PostgresBudgetStore(db) if db.is_postgres else LocalBudgetStore()
    if settings.redis_url:
        return FallbackBudgetStore(RedisBudgetStore(settings.redis_url), local)
    return local
