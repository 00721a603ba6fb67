"""The token refresh engine: one entry point that returns a valid access token.

Salesmsg rotates refresh tokens, so two refreshes of one connection at once kill it. Hence:

- in a process, single flight: one refresh per connection, every other caller awaits it;
- across processes, a lease on the connection row (owner and expiry, taken with one conditional
  UPDATE that commits at once: no transaction stays open across the call to Salesmsg);
- after taking the lease, the row is re-read: if another process refreshed meanwhile, its
  token is used and nothing is sent;
- the new tokens are written with compare-and-swap on ``version`` (and the lease owner);
- the HTTP timeout of the refresh call is at most half the lease, so a lease cannot run out
  while its holder is still waiting for Salesmsg.

Failures: ``invalid_grant``/401 means the grant is dead: ``needs_reauth`` at once, no retry.
5xx, 429 and network errors are transient: the old token is used while it is valid, the
connection cools down with jittered exponential backoff, and only after
``SMC_REFRESH_MAX_FAILURES`` in a row does it become ``needs_reauth``.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import socket
import time
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import audit_log
from app.audit.audit_log import Actor
from app.connections import events, token_client
from app.connections.store import ACTIVE, NEEDS_REAUTH
from app.connections.token_client import TokenEndpointError, TokenResponse
from app.core.db import Database
from app.core.errors import (
    AppError,
    Conflict,
    ServiceUnavailable,
    is_database_unavailable,
)
from app.core.logs import get_logger
from app.core.metrics import REFRESH_SECONDS, REFRESHES
from app.core.models import Connection
from app.core.settings import Settings
from app.vault.envelope import DataKey, DataKeyCache
from app.vault.tenant_keys import load_data_key

log = get_logger(__name__)

_POLL_SECONDS = 0.05
_STORE_RETRY_SECONDS = 10.0  # how long a refresh answer waits for the database to come back


class ConnectionNeedsReauth(Conflict):
    code, message = "connection_needs_reauth", "The tenant's Salesmsg connection must be reconnected."


class NotConnected(Conflict):
    code, message = "not_connected", "The tenant has no active Salesmsg connection."


class RefreshUnavailable(ServiceUnavailable):
    code, message = "refresh_unavailable", "The Salesmsg token could not be refreshed right now; try again shortly."


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the caller read of the connection row (the proxy reads it in its single query)."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    kind: str
    status: str
    version: int
    access_token_ct: bytes | None
    access_expires_at: datetime | None

    @classmethod
    def of(cls, conn: Connection) -> "Snapshot":
        return cls(conn.id, conn.tenant_id, conn.kind, conn.status, conn.version, conn.access_token_ct, conn.access_expires_at)


@dataclass(frozen=True, slots=True)
class AccessToken:
    value: str
    version: int
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class RowState:
    """The columns the engine works from, as read (or returned by the lease UPDATE)."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    kind: str
    status: str
    version: int
    access_token_ct: bytes | None
    refresh_token_ct: bytes | None
    access_expires_at: datetime | None
    refresh_failures: int
    next_refresh_at: datetime | None

    @classmethod
    def of(cls, row: RowState) -> "RowState | None":
        return None if row is None else cls(**row._mapping)


_COLUMNS = (
    Connection.id,
    Connection.tenant_id,
    Connection.kind,
    Connection.status,
    Connection.version,
    Connection.access_token_ct,
    Connection.refresh_token_ct,
    Connection.access_expires_at,
    Connection.refresh_failures,
    Connection.next_refresh_at,
)


class Refresher:
    """One per process; every caller (proxy, dashboard, worker) asks it for tokens."""

    def __init__(self, *, db: Database, http: aiohttp.ClientSession, settings: Settings, data_keys: DataKeyCache) -> None:
        self.db = db
        self.http = http
        self.settings = settings
        self.data_keys = data_keys
        self.owner = f"{socket.gethostname()[:30]}:{os.getpid()}:{secrets.token_hex(4)}"
        self.margin = timedelta(seconds=settings.refresh_margin_seconds)
        self.lease = timedelta(seconds=settings.refresh_lease_seconds)
        self.call_timeout = min(settings.salesmsg_timeout_seconds, settings.refresh_lease_seconds / 2)
        self._inflight: dict[uuid.UUID, asyncio.Future[AccessToken]] = {}

    # -- the entry point ------------------------------------------------------------------

    def fresh_enough(self, expires_at: datetime | None, now: datetime | None = None) -> bool:
        return expires_at is None or expires_at - (now or datetime.now(UTC)) > self.margin

    async def access_token(self, snapshot: Snapshot, *, key: DataKey | None = None) -> AccessToken:
        """A valid access token for the connection: the stored one, or a refreshed one.

        ``key`` is the tenant's data key when the caller already has it (the proxy reads it in
        its single query); otherwise it is loaded.
        """
        if snapshot.status != ACTIVE or snapshot.access_token_ct is None:
            raise ConnectionNeedsReauth() if snapshot.status == NEEDS_REAUTH else NotConnected()
        if self.fresh_enough(snapshot.access_expires_at):
            if key is not None:
                value = key.open_text(snapshot.access_token_ct, owner=snapshot.id, field="access_token")
            else:
                value = await self._open(snapshot.tenant_id, snapshot.id, snapshot.access_token_ct)
            return AccessToken(value, snapshot.version, snapshot.access_expires_at)
        return await self._single_flight(snapshot.id, seen_version=snapshot.version, force=False)

    async def force_refresh(self, connection_id: uuid.UUID, *, seen_version: int) -> AccessToken:
        """Refresh even a token we believe valid (Salesmsg answered 401 with it), unless
        someone already replaced the token of ``seen_version``."""
        return await self._single_flight(connection_id, seen_version=seen_version, force=True)

    async def _open(self, tenant_id: uuid.UUID, connection_id: uuid.UUID, blob: bytes) -> str:
        async with self.db.sessionmaker() as session:
            key = await load_data_key(session, self.data_keys, tenant_id)
        return key.open_text(blob, owner=connection_id, field="access_token")

    async def _single_flight(self, connection_id: uuid.UUID, *, seen_version: int, force: bool) -> AccessToken:
        running = self._inflight.get(connection_id)
        if running is None:
            running = asyncio.get_running_loop().create_task(self._refresh(connection_id, seen_version=seen_version, force=force))
            self._inflight[connection_id] = running
            running.add_done_callback(lambda _t: self._inflight.pop(connection_id, None))
        return await asyncio.shield(running)

    # -- across processes -----------------------------------------------------------------

    async def _take_lease(self, connection_id: uuid.UUID) -> RowState | None:
        now = datetime.now(UTC)
        async with self.db.session() as session:
            result = await session.execute(
                update(Connection)
                .where(
                    Connection.id == connection_id,
                    Connection.status == ACTIVE,
                    or_(Connection.lease_owner.is_(None), Connection.lease_expires_at < now),
                )
                .values(lease_owner=self.owner, lease_expires_at=now + self.lease)
                .returning(*_COLUMNS)
                .execution_options(synchronize_session=False)
            )
            return RowState.of(result.first())

    async def _read(self, connection_id: uuid.UUID) -> RowState | None:
        async with self.db.sessionmaker() as session:
            return RowState.of((await session.execute(select(*_COLUMNS).where(Connection.id == connection_id))).first())

    async def _refresh(self, connection_id: uuid.UUID, *, seen_version: int, force: bool) -> AccessToken:
        deadline = time.monotonic() + self.lease.total_seconds() + self.call_timeout
        while True:
            row = await self._take_lease(connection_id)
            if row is not None:
                return await self._refresh_holding_lease(row, seen_version=seen_version, force=force)
            current = await self._read(connection_id)
            if current is None or current.status != ACTIVE or current.access_token_ct is None:
                raise ConnectionNeedsReauth() if current is not None and current.status == NEEDS_REAUTH else NotConnected()
            if current.version != seen_version and self.fresh_enough(current.access_expires_at):
                return await self._token_of(current)
            if time.monotonic() > deadline:
                return await self._fallback(current)
            await asyncio.sleep(_POLL_SECONDS * (0.5 + random.random()))

    async def refresh_leased(self, row: RowState) -> AccessToken | None:
        """For the worker, which took the lease in its batch: refresh under this process's single flight."""
        running = self._inflight.get(row.id)
        if running is not None:
            await self._release(row.id)
            return await asyncio.shield(running)
        task = asyncio.get_running_loop().create_task(self._refresh_holding_lease(row, seen_version=row.version, force=False))
        self._inflight[row.id] = task
        task.add_done_callback(lambda _t: self._inflight.pop(row.id, None))
        return await asyncio.shield(task)

    async def _refresh_holding_lease(self, row: RowState, *, seen_version: int, force: bool) -> AccessToken:
        lease_ends = time.monotonic() + self.lease.total_seconds()  # taken just now (or by the worker's batch)
        now = datetime.now(UTC)
        already_done = row.version != seen_version and (force or self.fresh_enough(row.access_expires_at, now))
        if already_done or (not force and self.fresh_enough(row.access_expires_at, now)):
            await self._release(row.id)
            return await self._token_of(row)
        if not force and row.next_refresh_at is not None and row.next_refresh_at > now:
            await self._release(row.id)  # cooling down after transient failures
            return await self._fallback(row)
        key = await self._key(row)
        refresh_token = key.open_text(row.refresh_token_ct, owner=row.id, field="refresh_token") if row.refresh_token_ct else None
        if row.kind == "oauth" and refresh_token is None:
            await self._mark_dead(row, TokenEndpointError("dead", status=None, error="no_refresh_token"))
            raise ConnectionNeedsReauth()
        started = time.perf_counter()
        try:
            if row.kind == "pat":
                current = key.open_text(row.access_token_ct, owner=row.id, field="access_token")
                answer = await token_client.refresh_pat(self.http, self.settings, token=current, timeout=self.call_timeout)
            else:
                assert refresh_token is not None
                answer = await token_client.refresh_oauth(self.http, self.settings, refresh_token=refresh_token, timeout=self.call_timeout)
        except TokenEndpointError as exc:
            REFRESH_SECONDS.observe(time.perf_counter() - started)
            if exc.transient or exc.kind == "invalid":
                REFRESHES.labels("transient").inc()
                return await self._transient(row, exc)
            REFRESHES.labels("dead").inc()
            await self._mark_dead(row, exc)
            raise ConnectionNeedsReauth() from exc
        REFRESH_SECONDS.observe(time.perf_counter() - started)
        REFRESHES.labels("success").inc()
        return await self._store(row, key, answer, refresh_token, lease_ends=lease_ends)

    async def _key(self, row: RowState):
        async with self.db.sessionmaker() as session:
            return await load_data_key(session, self.data_keys, row.tenant_id)

    async def _token_of(self, row: RowState) -> AccessToken:
        if row.access_token_ct is None:
            raise NotConnected()
        return AccessToken(await self._open(row.tenant_id, row.id, row.access_token_ct), row.version, row.access_expires_at)

    async def _fallback(self, row: RowState) -> AccessToken:
        """No fresh token now: the current one while it has not expired, else 503."""
        if row.access_token_ct is not None and (row.access_expires_at is None or row.access_expires_at > datetime.now(UTC)):
            return await self._token_of(row)
        retry = "5"
        if row.next_refresh_at is not None:
            retry = str(max(1, int((row.next_refresh_at - datetime.now(UTC)).total_seconds())))
        raise RefreshUnavailable(headers={"Retry-After": retry})

    async def _release(self, connection_id: uuid.UUID) -> None:
        async with self.db.session() as session:
            await session.execute(
                update(Connection)
                .where(Connection.id == connection_id, Connection.lease_owner == self.owner)
                .values(lease_owner=None, lease_expires_at=None)
                .execution_options(synchronize_session=False)
            )

    async def _store(self, row: RowState, key, answer: TokenResponse, old_refresh: str | None, *, lease_ends: float) -> AccessToken:
        """Write what Salesmsg answered. Salesmsg has already rotated the refresh token, so losing
        this write loses the grant: while the database is briefly away, keep trying, with backoff
        and every attempt bounded, until a safety margin before our lease ends (after that another
        process may take the lease and refresh with the token Salesmsg has retired)."""
        give_up = min(time.monotonic() + _STORE_RETRY_SECONDS, lease_ends - min(5.0, self.lease.total_seconds() / 4))
        delay = 0.1
        while True:
            try:
                async with asyncio.timeout(max(2.0, give_up - time.monotonic())):
                    return await self._store_once(row, key, answer, old_refresh)
            except Exception as exc:
                if not is_database_unavailable(exc) or time.monotonic() + delay > give_up:
                    raise
                log.warning("refreshed tokens not stored yet: database unavailable; retrying",
                            connection_id=str(row.id), retry_in=round(delay, 2))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _store_once(self, row: RowState, key, answer: TokenResponse, old_refresh: str | None) -> AccessToken:
        now = datetime.now(UTC)
        expires_in = answer.expires_in or (3600 if row.kind == "pat" else None)
        expires_at = now + timedelta(seconds=expires_in) if expires_in else None
        new_refresh = answer.refresh_token or old_refresh  # Salesmsg may omit it: keep the old one
        values = {
            "access_token_ct": key.seal(answer.access_token, owner=row.id, field="access_token"),
            "refresh_token_ct": key.seal(new_refresh, owner=row.id, field="refresh_token") if new_refresh else None,
            "access_expires_at": expires_at,
            "version": row.version + 1,
            "last_refresh_at": now,
            "refresh_failures": 0,
            "next_refresh_at": None,
            "last_error": None,
            "lease_owner": None,
            "lease_expires_at": None,
        }
        async with self.db.session() as session:
            result = await session.execute(
                update(Connection)
                .where(Connection.id == row.id, Connection.version == row.version, Connection.lease_owner == self.owner)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:
                # Reconnected or disconnected while we refreshed: those tokens belong to a grant
                # that no longer is this connection's. Drop them.
                log.warning("refresh result discarded: connection changed meanwhile", connection_id=str(row.id))
                found = RowState.of((await session.execute(select(*_COLUMNS).where(Connection.id == row.id))).first())
                if found is None or found.status != ACTIVE:
                    raise NotConnected()
                return await self._token_of(found)
            await events.emit(session, tenant_id=row.tenant_id, connection_id=row.id, type="refreshed",
                              data={"expires_at": expires_at.isoformat() if expires_at else None,
                                    "rotated": answer.refresh_token is not None})
            if row.refresh_failures:
                await events.emit(session, tenant_id=row.tenant_id, connection_id=row.id, type="recovered",
                                  data={"after_failures": row.refresh_failures})
        log.info("token refreshed", connection_id=str(row.id), kind=row.kind, version=row.version + 1)
        return AccessToken(answer.access_token, row.version + 1, expires_at)

    async def _mark_dead(self, row: RowState, exc: TokenEndpointError) -> None:
        """The grant is gone: after re-reading to rule out a race, flag needs_reauth and audit."""
        async with self.db.session() as session:
            result = await session.execute(
                update(Connection)
                .where(Connection.id == row.id, Connection.version == row.version)
                .values(status=NEEDS_REAUTH, last_error=f"{exc.error or exc.status}"[:200], lease_owner=None,
                        lease_expires_at=None, next_refresh_at=None)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:
                return  # someone refreshed or reconnected meanwhile: their state stands
            await events.emit(session, tenant_id=row.tenant_id, connection_id=row.id, type="needs_reauth",
                              data={"reason": exc.error or str(exc.status)})
            await audit_log.record(session, "connection.needs_reauth", Actor.system(), outcome="failure",
                               tenant_id=row.tenant_id, target=str(row.id), details={"reason": exc.error or str(exc.status)})
        log.warning("connection needs reauth", connection_id=str(row.id), reason=exc.error or exc.status)

    def backoff(self, failures: int) -> float:
        ceiling = min(self.settings.refresh_backoff_max_seconds, self.settings.refresh_backoff_base_seconds * 2 ** (failures - 1))
        return random.uniform(ceiling / 2, ceiling)  # jitter

    async def _transient(self, row: RowState, exc: TokenEndpointError) -> AccessToken:
        failures = row.refresh_failures + 1
        give_up = failures >= self.settings.refresh_max_failures
        now = datetime.now(UTC)
        cooldown = self.backoff(failures)
        if exc.retry_after is not None:  # Salesmsg said how long: never come back sooner
            cooldown = max(cooldown, min(exc.retry_after, self.settings.refresh_backoff_max_seconds))
        async with self.db.session() as session:
            values: dict[str, Any] = {
                "refresh_failures": failures,
                "next_refresh_at": now + timedelta(seconds=cooldown),
                "last_error": f"{exc.error or exc.status}"[:200],
                "lease_owner": None,
                "lease_expires_at": None,
            }
            if give_up:
                values["status"] = NEEDS_REAUTH
            await session.execute(
                update(Connection)
                .where(Connection.id == row.id, Connection.lease_owner == self.owner)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            await events.emit(session, tenant_id=row.tenant_id, connection_id=row.id, type="refresh_failed",
                              data={"reason": exc.error or str(exc.status), "failures": failures})
            if give_up:
                await events.emit(session, tenant_id=row.tenant_id, connection_id=row.id, type="needs_reauth",
                                  data={"reason": "too_many_failures", "failures": failures})
                await audit_log.record(session, "connection.needs_reauth", Actor.system(), outcome="failure",
                                   tenant_id=row.tenant_id, target=str(row.id), details={"reason": "too_many_failures"})
        log.warning("refresh failed", connection_id=str(row.id), reason=exc.error or exc.status, failures=failures)
        if give_up:
            raise ConnectionNeedsReauth()
        return await self._fallback(replace(row, refresh_failures=failures, next_refresh_at=values["next_refresh_at"]))

    # -- the proactive sweep --------------------------------------------------------------

    async def lease_due(self, session: AsyncSession, *, limit: int) -> list[RowState]:
        """Take the lease on up to ``limit`` connections due for refresh (SKIP LOCKED on PostgreSQL)."""
        now = datetime.now(UTC)
        due = (
            select(Connection.id)
            .where(
                Connection.status == ACTIVE,
                Connection.access_expires_at.is_not(None),
                Connection.access_expires_at < now + self.margin,
                or_(Connection.next_refresh_at.is_(None), Connection.next_refresh_at <= now),
                or_(Connection.lease_owner.is_(None), Connection.lease_expires_at < now),
            )
            .order_by(Connection.access_expires_at)
            .limit(limit)
        )
        if session.get_bind().dialect.name == "postgresql":
            due = due.with_for_update(skip_locked=True)
        result = await session.execute(
            update(Connection)
            .where(and_(Connection.id.in_(due.scalar_subquery())))
            .values(lease_owner=self.owner, lease_expires_at=now + self.lease)
            .returning(*_COLUMNS)
            .execution_options(synchronize_session=False)
        )
        return [RowState(**r._mapping) for r in result.all()]


async def refresh_due(refresher: Refresher, *, batch: int, concurrency: int) -> dict[str, int]:
    """One sweep: lease a batch of due connections, refresh them with bounded concurrency."""
    counts = {"leased": 0, "refreshed": 0, "failed": 0}
    async with refresher.db.session() as session:
        rows = await refresher.lease_due(session, limit=batch)
    counts["leased"] = len(rows)
    gate = asyncio.Semaphore(concurrency)

    async def one(row: RowState) -> None:
        async with gate:
            try:
                await refresher.refresh_leased(row)
                counts["refreshed"] += 1
            except AppError:
                counts["failed"] += 1
            except Exception:  # noqa: BLE001 - one bad row must not stop the sweep
                counts["failed"] += 1
                log.exception("refresh crashed", connection_id=str(row.id))
                await refresher._release(row.id)

    await asyncio.gather(*(one(r) for r in rows))
    return counts
