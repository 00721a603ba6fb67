"""A cache of the proxy's grant rows (``grants``) whose invalidation is exact where it matters.

A grant (key, tenant, BAA, connection, data key) is served from memory only while this process can
prove it is not stale by more than ``BOUND_SECONDS`` (100 ms):

- **Other processes and replicas.** PostgreSQL triggers (migration 0004) send a notification on
  channel ``smc_grants`` when a row a grant is made of changes: a key (revoked, its hash, its
  tenants, read-only), a tenant (slug, HIPAA, BAA), a connection (status, scopes, tokens, a
  refresh), a data key; and on any insert, delete or truncate of those tables. A listening
  connection of each process receives them and empties the cache.
- **Proof that the channel works.** The same connection sends a heartbeat to itself every
  ``HEARTBEAT_SECONDS`` on a channel of its own. PostgreSQL delivers a listener's notifications
  in the order their transactions committed, so receiving a heartbeat sent at time ``s`` proves
  that every change committed before ``s`` has been delivered (and applied). The cache serves only
  while the last heartbeat received was sent less than ``BOUND_SECONDS`` ago: a revocation
  committed at ``t`` is seen by every call from ``t + 100 ms`` on, whatever happens to the channel.
  While it is down, cut silently or re-syncing after a reconnect, the cache is bypassed (every
  call reads the database, as with no cache) and nothing is stored in it.
- **This process's own changes, at once.** Every statement this process sends through the engine
  that writes one of those tables empties the cache and bypasses it until the connection that
  wrote returns to the pool (after its commit or rollback), so a call that follows a change in
  the same process reads the database; a lookup that raced a change is not stored
  (``generation``). A write that cannot change a grant says so with the execution option
  ``app.core.db.GRANTS_UNAFFECTED`` (the key usage recorder's ``last_used_at``).

Only PostgreSQL deployments cache (SQLite has no notifications; the CLI can write it beside a
running server). Only complete grants (a valid key row and its tenant) are stored, at most
``max_entries``; an unknown key or tenant is always read from the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import secrets
import time
from collections.abc import Callable, Hashable
from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from app.core.db import GRANTS_UNAFFECTED
from app.core.logs import get_logger
from app.core.metrics import GRANT_CACHE, GRANT_CHANNEL_DOWN, child

log = get_logger(__name__)

CHANNEL = "smc_grants"
BOUND_SECONDS = 0.1
HEARTBEAT_SECONDS = 0.025
RECONNECT_SECONDS = 0.5
WATCHED = frozenset({"api_keys", "api_key_tenants", "tenants", "connections", "tenant_keys"})
_WRITE = re.compile(r"\s*(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM|TRUNCATE(?:\s+TABLE)?(?:\s+ONLY)?)\s+\"?(\w+)", re.IGNORECASE)
_HIT, _MISS, _BYPASS = (child(GRANT_CACHE, outcome) for outcome in ("hit", "miss", "bypass"))
_WROTE = "smc_grants_wrote"
# URL options SQLAlchemy's asyncpg dialect consumes itself (asyncpg.connect would refuse them)
_SQLALCHEMY_ONLY = frozenset({"prepared_statement_cache_size", "prepared_statement_name_func", "async_fallback"})
_TRIGGERS = (  # migration 0004's triggers, enabled: without them no change is ever announced
    "SELECT count(*) FROM pg_trigger WHERE tgname = 'smc_grants_changed' AND tgenabled <> 'D'"
)  # pooled connection info: this connection wrote a watched table


def writes_watched(statement: str) -> bool:
    """Whether a SQL statement writes (or truncates) a table a grant is made of."""
    match = _WRITE.match(statement)
    if match is None:
        return False
    if statement.lstrip()[:8].upper() == "TRUNCATE":
        return True  # TRUNCATE a, b, ...: any table named may be one
    return match.group(1).lower() in WATCHED


class GrantCache:
    """Grants by (key prefix, tenant reference); see the module's docstring for when it serves."""

    def __init__(self, *, max_entries: int = 20_000, bound: float = BOUND_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.entries: dict[Hashable, Any] = {}
        self.max_entries = max_entries
        self.bound = bound
        self.clock = clock
        self.generation = 0  # moves on every invalidation: a lookup that straddles one is not stored
        self.fresh_until = 0.0  # the channel proved every change committed before (this - bound) delivered
        self.writing: set[object] = set()  # connections of this process that wrote and are not back in the pool

    def serving(self) -> bool:
        return not self.writing and self.clock() < self.fresh_until

    def get(self, key: Hashable) -> Any:
        if not self.serving():
            _BYPASS.inc()
            return None
        found = self.entries.get(key)
        (_HIT if found is not None else _MISS).inc()
        return found

    def put(self, key: Hashable, value: Any, *, generation: int) -> None:
        """Store what a lookup that began at ``generation`` read, unless anything changed since."""
        if generation != self.generation or not self.serving():
            return
        if len(self.entries) >= self.max_entries:
            self.entries.clear()
        self.entries[key] = value

    def invalidate(self) -> None:
        self.generation += 1
        self.entries.clear()

    def confirmed(self, sent_at: float) -> None:
        """A heartbeat sent at ``sent_at`` came back: every earlier change has been applied."""
        self.fresh_until = max(self.fresh_until, sent_at + self.bound)

    def channel_lost(self) -> None:
        self.fresh_until = 0.0
        self.invalidate()

    # -- this process's own writes -------------------------------------------------------------

    def watch_engine(self, engine: AsyncEngine) -> None:
        """Hook the engine: a write to a watched table empties the cache and bypasses it until the
        connection that wrote is back in the pool (its transaction over)."""
        sync_engine = engine.sync_engine

        @event.listens_for(sync_engine, "before_cursor_execute")
        def _wrote(conn, _cursor, statement, _parameters, context, _executemany) -> None:
            if statement[:1] in ("S", "s", "W", "w") or not writes_watched(statement):  # SELECT, WITH: a read
                return
            if context is not None and context.execution_options.get(GRANTS_UNAFFECTED):
                return
            info = conn.info
            token = info.get(_WROTE)
            if token is None:
                token = info[_WROTE] = object()
                self.writing.add(token)
            self.invalidate()

        @event.listens_for(sync_engine.pool, "checkin")
        @event.listens_for(sync_engine.pool, "detach")  # a connection dropped, not returned, must not keep it off
        def _returned(_dbapi_connection, record) -> None:
            token = record.info.pop(_WROTE, None)
            if token is not None:
                self.writing.discard(token)
                self.invalidate()


class GrantChannel:
    """The listening connection of one process: invalidations in, heartbeats round trip."""

    def __init__(self, cache: GrantCache, *, connect_kwargs: dict[str, Any], heartbeat: float = HEARTBEAT_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cache = cache
        self.connect_kwargs = connect_kwargs
        self.heartbeat = heartbeat
        self.clock = clock
        self.beat_channel = f"smc_grants_beat_{secrets.token_hex(6)}"
        self._sent: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None
        self.failures = 0  # attempts to listen that failed (read by the tests)
        self.connection: asyncpg.Connection | None = None
        self.connected = asyncio.Event()  # the channel is listening (read by the tests)

    @classmethod
    def for_engine(cls, cache: GrantCache, engine: AsyncEngine) -> GrantChannel:
        args, kwargs = engine.dialect.create_connect_args(engine.url)
        assert not args
        kwargs = {k: v for k, v in kwargs.items() if k not in _SQLALCHEMY_ONLY}
        kwargs["server_settings"] = {"application_name": "salesmsg-connect-grants"}
        return cls(cache, connect_kwargs=kwargs)

    def start(self) -> None:
        GRANT_CHANNEL_DOWN.set(1)  # until it listens
        self._task = asyncio.get_running_loop().create_task(self._run(), name="grant-channel")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        GRANT_CHANNEL_DOWN.set(0)  # a stopped process is no outage

    def _notified(self, _conn: object, _pid: int, _channel: str, _payload: str) -> None:
        self.cache.invalidate()

    def _terminated(self, lost: asyncio.Event, _conn: object) -> None:
        self.cache.channel_lost()  # bypass at once, before the loop notices
        lost.set()

    def _beat(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        sent = self._sent.pop(int(payload), None)
        if sent is not None:
            self.cache.confirmed(sent)

    async def _run(self) -> None:
        self.failures = failures = 0
        while True:
            lost = asyncio.Event()
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(timeout=5, **self.connect_kwargs)
                conn.add_termination_listener(functools.partial(self._terminated, lost))
                if await conn.fetchval(_TRIGGERS) < len(WATCHED):
                    raise LookupError("the grant triggers (migration 0004) are missing or disabled")
                await conn.add_listener(CHANNEL, self._notified)
                await conn.add_listener(self.beat_channel, self._beat)
                self.cache.invalidate()  # what was read before LISTEN may have changed unseen
                self.connection = conn
                self.connected.set()
                GRANT_CHANNEL_DOWN.set(0)
                if failures:
                    log.warning("grant cache channel listening again")
                failures = 0
                beat = 0
                self._sent = {}  # a new connection: its heartbeats count from 1 again
                while not lost.is_set():
                    beat += 1
                    self._sent.pop(beat - 8, None)  # an unanswered heartbeat expires
                    self._sent[beat] = self.clock()
                    async with asyncio.timeout(1.0):  # not wait_for: on Python 3.11 it can swallow a cancel
                        await conn.execute(f"NOTIFY {self.beat_channel}, '{beat}'")
                    await asyncio.sleep(self.heartbeat)
                raise ConnectionError("the listening connection closed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the channel is down: bypass, then listen again
                failures += 1
                self.failures += 1
                if failures == 1:
                    log.warning("grant cache channel down: every proxied call reads the database", error=type(exc).__name__,
                                reason=str(exc) if isinstance(exc, LookupError) else None)
            finally:
                self.cache.channel_lost()
                self.connected.clear()
                self.connection = None
                GRANT_CHANNEL_DOWN.set(1)
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(min(RECONNECT_SECONDS * failures, 5.0))
