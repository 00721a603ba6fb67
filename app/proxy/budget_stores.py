"""Where the budget ledgers live (``app.proxy.budget``): PostgreSQL, or Redis when configured.

Each runs the same ``plan`` on the ledger atomically: PostgreSQL locks the budget's row for the
read and the write; Redis takes the budget's lock (redis-py's, released by a script only by its
holder, lapsing if the holder dies). On SQLite (the embedded demo, one process by design) the ledgers live in the process:
a request's own transaction may hold SQLite's only write lock while it calls Salesmsg.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import LockError, RedisError, WatchError
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from app.core.db import Database
from app.core.errors import UNAVAILABLE_SQLSTATES
from app.core.logs import get_logger
from app.core.metrics import REDIS_FALLBACK, child
from app.core.models import BudgetLedger
from app.core.settings import Settings
from app.core.tracing import db_span
from app.proxy.budget import BudgetBusy, BudgetRules, BudgetStore, BudgetUnavailable, Ledger, Verdict, plan

log = get_logger(__name__)
_T = TypeVar("_T")
_LOCK_LEDGER = "SELECT ledger FROM upstream_budgets WHERE key = $1 FOR UPDATE"
_NEW_LEDGER = "INSERT INTO upstream_budgets (key, ledger) VALUES ($1, $2) ON CONFLICT DO NOTHING"
_WRITE_LEDGER = "UPDATE upstream_budgets SET ledger = $2 WHERE key = $1"
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


class _KeyedLocks:
    """One asyncio lock per budget key while someone holds or awaits it (then forgotten)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class _SharedLedgers:
    """``take`` and ``lock`` as one atomic read-decide-write each (``_update``, per store).

    Group commit: the calls of one process for one budget that arrive while its ledger is being
    written go together into the next write, each decided by ``plan`` in arrival order, exactly
    as if they had queued one by one (the clock is still read inside the store's lock, once per
    write). A stampede therefore costs the store one waiter per process, and a busy budget one
    transaction per batch instead of one per call."""

    clock: Clock

    def __init__(self, *, clock: Clock) -> None:
        self.clock = clock
        self._keyed = _KeyedLocks()
        self._pending: dict[str, list[tuple[BudgetRules, str, asyncio.Future[Verdict]]]] = {}
        self._drains: set[asyncio.Task[None]] = set()

    async def _update(self, key: str, change: Callable[[Ledger], tuple[_T, bool]]) -> _T:
        raise NotImplementedError

    async def take(self, key: str, *, rules: BudgetRules, caller: str) -> Verdict:
        waiter: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        pending = self._pending.get(key)
        if pending is None:  # nobody is writing this ledger: start the writer of its batches
            pending = self._pending[key] = []
            drain = asyncio.get_running_loop().create_task(self._drain(key), name="budget-batch")
            self._drains.add(drain)
            drain.add_done_callback(self._drains.discard)
        pending.append((rules, caller, waiter))
        return await waiter

    async def _drain(self, key: str) -> None:
        """Write the waiting calls of ``key`` in batches until none waits (then forget the key)."""
        batch: list[tuple[BudgetRules, str, asyncio.Future[Verdict]]] = []
        try:
            while True:
                batch = [call for call in self._pending[key] if not call[2].done()]  # a cancelled call takes nothing
                self._pending[key] = []
                if not batch:
                    return
                async with self._keyed.hold(key):
                    try:
                        verdicts = await self._update(key, _taking_all(batch, clock=self.clock))
                    except BudgetUnavailable as exc:
                        for _, _, waiter in batch:
                            if not waiter.done():
                                waiter.set_exception(type(exc)(*exc.args))
                        continue
                for (_, _, waiter), verdict in zip(batch, verdicts, strict=True):
                    if not waiter.done():
                        waiter.set_result(verdict)
        except BaseException as exc:  # cancelled (shutdown) or a bug: no caller may wait forever
            for _, _, waiter in [*batch, *self._pending.get(key, [])]:
                if not waiter.done():
                    waiter.set_exception(BudgetUnavailable(type(exc).__name__))
            raise
        finally:
            del self._pending[key]

    async def lock(self, key: str, *, until: float) -> None:
        async with self._keyed.hold(key):
            await self._update(key, _locking(until))


class PostgresBudgetStore(_SharedLedgers):
    def __init__(self, db: Database, *, clock: Clock = time.time) -> None:
        super().__init__(clock=clock)
        self.db = db

    async def _update(self, key: str, change: Callable[[Ledger], tuple[_T, bool]]) -> _T:
        """One transaction on asyncpg itself (a connection of SQLAlchemy's pool): the row locked,
        read, decided on and written, without SQLAlchemy's statement layers on the hot path."""
        try:
            async with self.db.engine.connect() as conn:
                raw = (await conn.get_raw_connection()).driver_connection
                assert raw is not None
                try:
                    async with raw.transaction():
                        with db_span("SELECT upstream_budgets", _LOCK_LEDGER):
                            stored = await raw.fetchval(_LOCK_LEDGER, key)
                        if stored is None:
                            with db_span("INSERT upstream_budgets", _NEW_LEDGER):
                                await raw.execute(_NEW_LEDGER, key, Ledger().encode())
                                stored = await raw.fetchval(_LOCK_LEDGER, key)
                        ledger = Ledger.decode(stored)
                        result, changed = change(ledger)  # the row is locked: the clock is read now
                        if changed:
                            with db_span("UPDATE upstream_budgets", _WRITE_LEDGER):
                                await raw.execute(_WRITE_LEDGER, key, ledger.encode())
                except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                    await conn.invalidate(exc)  # this pooled connection is gone: never hand it out again
                    raise
                except asyncpg.PostgresError as exc:
                    if str(exc.sqlstate or "").startswith(UNAVAILABLE_SQLSTATES):  # e.g. 57P01 admin shutdown
                        await conn.invalidate(exc)
                    raise
        except (SQLAlchemyError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise BudgetUnavailable(type(exc).__name__) from exc
        return result

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


class RedisBudgetStore(_SharedLedgers):
    """One Redis string per budget (the ledger's JSON), expiring once it says nothing."""

    PREFIX = "smc:budget:"

    def __init__(self, url: str, *, clock: Clock = time.time) -> None:
        super().__init__(clock=clock)
        self.redis = aioredis.Redis.from_url(url.removeprefix("async+"), socket_timeout=2, socket_connect_timeout=2)

    @staticmethod
    def _ttl(ledger: Ledger) -> int:
        last = max((t for t, _, _ in ledger.slots), default=0.0)
        return max(1, math.ceil(max(last + _KEEP_SECONDS, ledger.tat, ledger.locked_until) - time.time()))

    async def _update(self, key: str, change: Callable[[Ledger], tuple[_T, bool]]) -> _T:
        """Read, decide and write under the budget's Redis lock: a stampede of callers queues on
        the lock instead of racing (optimistic WATCH retries collapse under a hundred at once).
        The write is also WATCHed, so a holder whose lock lapsed (a pause past ``_LOCK_SECONDS``)
        cannot overwrite a newer ledger: its call is refused instead."""
        name = self.PREFIX + key
        lock = self.redis.lock(name + ":lock", timeout=_LOCK_SECONDS, sleep=0.01, blocking_timeout=_LOCK_WAIT_SECONDS)
        try:
            if not await lock.acquire():
                raise BudgetBusy("the ledger stayed locked")
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    await pipe.watch(name)
                    ledger = Ledger.decode(await pipe.get(name))
                    result, changed = change(ledger)  # the ledger is locked: the clock is read now
                    if changed:
                        pipe.multi()
                        pipe.set(name, ledger.encode(), ex=self._ttl(ledger))
                        await pipe.execute()
                return result
            except WatchError:
                raise BudgetBusy("the ledger changed under a lapsed lock") from None
            finally:
                try:
                    await lock.release()
                except LockError:
                    pass  # it lapsed: the WATCH above kept the write safe
        except BudgetBusy:
            raise
        except (RedisError, OSError) as exc:
            raise BudgetUnavailable(type(exc).__name__) from exc

    async def read(self, key: str) -> Ledger:
        try:
            return Ledger.decode(await self.redis.get(self.PREFIX + key))
        except (RedisError, OSError) as exc:
            raise BudgetUnavailable(type(exc).__name__) from exc

    async def close(self) -> None:
        await self.redis.aclose()


def _taking_all(
    calls: list[tuple[BudgetRules, str, asyncio.Future[Verdict]]], *, clock: Clock
) -> Callable[[Ledger], tuple[list[Verdict], bool]]:
    def change(ledger: Ledger) -> tuple[list[Verdict], bool]:
        now = clock()  # the ledger is locked: the clock is read now
        verdicts = [plan(ledger, rules=rules, now=now, caller=caller) for rules, caller, _ in calls]
        return verdicts, any(v.at is not None for v in verdicts)

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
    the org out as always. A lockout written only to the database while Redis was away is written
    to Redis as well when it answers again. A busy ledger (``BudgetBusy``) is no outage: that call
    is refused and Redis stays in use."""

    def __init__(self, primary: BudgetStore, fallback: BudgetStore, *, retry_seconds: float = 5.0) -> None:
        self.primary = primary
        self.fallback = fallback
        self.retry_seconds = retry_seconds
        self.down_until = 0.0  # 0: Redis in use
        self.unshared: dict[str, float] = {}  # lockouts only the database holds

    async def _primary(self) -> bool:
        """Whether to ask Redis now; when it is back, first hand it the lockouts it missed."""
        if not self.down_until and not self.unshared:
            return True
        if time.monotonic() < self.down_until:
            return False
        try:
            for key, until in list(self.unshared.items()):
                if until > time.time():
                    await self.primary.lock(key, until=until)
                del self.unshared[key]
        except BudgetBusy:
            return True
        except BudgetUnavailable as exc:
            self._failed(exc)
            return False
        if self.down_until:
            log.warning("redis answers again: budgets are kept there again")
            child(REDIS_FALLBACK, "budgets").set(0)
            self.down_until = 0.0
        return True

    def _failed(self, exc: BudgetUnavailable) -> None:
        if not self.down_until:
            log.warning("redis unreachable: budgets are kept in the database until it answers", error=str(exc))
            child(REDIS_FALLBACK, "budgets").set(1)
        self.down_until = time.monotonic() + self.retry_seconds

    async def take(self, key: str, *, rules: BudgetRules, caller: str) -> Verdict:
        if await self._primary():
            try:
                return await self.primary.take(key, rules=rules, caller=caller)
            except BudgetBusy:
                raise
            except BudgetUnavailable as exc:
                self._failed(exc)
        return await self.fallback.take(key, rules=rules, caller=caller)

    async def lock(self, key: str, *, until: float) -> None:
        await self.fallback.lock(key, until=until)  # both: whichever is asked next must know
        try:
            await self.primary.lock(key, until=until)
        except BudgetUnavailable as exc:
            self.unshared[key] = max(until, self.unshared.get(key, 0.0))
            if not isinstance(exc, BudgetBusy):
                self._failed(exc)

    async def read(self, key: str) -> Ledger:
        if await self._primary():
            try:
                return await self.primary.read(key)
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
