"""Where the budget ledgers live (``app.proxy.budget``): PostgreSQL, or Redis when configured.

Each runs the same ``plan`` on the ledger atomically: PostgreSQL locks the budget's row for the
read and the write; Redis watches the key and decides again if another process changed it in
between. On SQLite (the embedded demo, one process by design) the ledgers live in the process:
a request's own transaction may hold SQLite's only write lock while it calls Salesmsg.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError, WatchError
from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import SQLAlchemyError

from app.core.db import Database
from app.core.models import BudgetLedger
from app.core.settings import Settings
from app.proxy.budget import BudgetRules, BudgetStore, BudgetUnavailable, Ledger, Verdict, plan

_T = TypeVar("_T")
_KEEP_SECONDS = 120.0  # a ledger says nothing once its last grant is this old (windows are at most 90 s)
_WATCH_TRIES = 20  # Redis: decisions raced away by other processes before this one gives up
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
        name = self.PREFIX + key
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                for _ in range(_WATCH_TRIES):
                    try:
                        await pipe.watch(name)
                        ledger = Ledger.decode(await pipe.get(name))
                        result, changed = change(ledger)
                        if not changed:
                            await pipe.unwatch()
                            return result
                        pipe.multi()
                        pipe.set(name, ledger.encode(), ex=self._ttl(ledger))
                        await pipe.execute()
                        return result
                    except WatchError:  # another process changed the ledger in between: decide again on the new one
                        await asyncio.sleep(random.uniform(0, 0.005))
        except (RedisError, OSError) as exc:
            raise BudgetUnavailable(type(exc).__name__) from exc
        raise BudgetUnavailable("the ledger kept changing under this process")

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


def budget_store(settings: Settings, db: Database) -> BudgetStore:
    if settings.redis_url:
        return RedisBudgetStore(settings.redis_url)
    return PostgresBudgetStore(db) if db.is_postgres else LocalBudgetStore()
