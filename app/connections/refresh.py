"""The token refresh engine: one entry point that returns a valid access token.

Salesmsg rotates refresh tokens, so two refreshes of one connection at once kill it. Hence:

- in a process, single flight: one refresh per connection, every other caller awaits it;
- across processes, the lease on the connection row (``transitions.take_lease``: owner and expiry, taken with
  one conditional UPDATE that commits at once, so no transaction stays open across the call to
  Salesmsg);
- after taking the lease, the row is as the lease query returned it: if another process
  refreshed meanwhile, its token is used and nothing is sent;
- the new tokens are written with compare-and-swap on ``version`` and the lease owner
  (``transitions.refreshed``);
- the HTTP timeout of the refresh call is at most half the lease, so a lease cannot run out
  while its holder is still waiting for Salesmsg.

Failures: ``invalid_grant``/401 means the grant is dead: ``needs_reauth`` at once, no retry.
5xx, 429 and network errors are transient: the old token is used while it is valid, the
connection cools down with jittered exponential backoff, and only after
``SMC_REFRESH_MAX_FAILURES`` in a row does it become ``needs_reauth``.

With tracing on (``app.core.tracing``), each refresh this process runs is a ``salesmsg.refresh``
span holding the tenant and ``smc.refresh.outcome``: success, transient, dead, not_needed (fresh,
or refreshed elsewhere meanwhile), cooling_down, lease_busy, superseded, unusable or error.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import socket
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from app.connections import token_client, transitions
from app.connections.store import open_access_token, open_refresh_token, read_view
from app.connections.token_client import TokenEndpointError, TokenResponse
from app.connections.view import ACTIVE, NEEDS_REAUTH, PAT, ConnectionView
from app.core import tracing
from app.core.db import Database
from app.core.errors import (
    AppError,
    Conflict,
    ServiceUnavailable,
    is_database_unavailable,
)
from app.core.logs import get_logger
from app.core.metrics import REFRESH_SECONDS, REFRESHES
from app.core.settings import Settings
from app.kit.backoff import jittered
from app.vault.envelope import DataKey, DataKeyCache
from app.vault.tenant_keys import load_data_key

log = get_logger(__name__)

_POLL_SECONDS = 0.05
_STORE_RETRY_SECONDS = 10.0  # how long a refresh answer waits for the database to come back
_PAT_LIFETIME = 3600  # a refreshed PAT whose answer names no lifetime is refreshed within the hour


def _outcome(value: str, view: ConnectionView | None = None) -> None:
    """The refresh span's outcome (and tenant); nothing when tracing is off."""
    tracing.annotate({tracing.REFRESH_OUTCOME: value, tracing.TENANT_ID: str(view.tenant_id) if view is not None else None})


class ConnectionNeedsReauth(Conflict):
    code, message = "connection_needs_reauth", "The tenant's Salesmsg connection must be reconnected."


class NotConnected(Conflict):
    code, message = "not_connected", "The tenant has no active Salesmsg connection."


class RefreshUnavailable(ServiceUnavailable):
    code, message = "refresh_unavailable", "The Salesmsg token could not be refreshed right now; try again shortly."


def _unusable(view: ConnectionView | None) -> AppError:
    return ConnectionNeedsReauth() if view is not None and view.status == NEEDS_REAUTH else NotConnected()


@dataclass(frozen=True, slots=True)
class AccessToken:
    value: str
    version: int
    expires_at: datetime | None


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

    # -- the entry points -----------------------------------------------------------------

    def fresh_enough(self, expires_at: datetime | None, now: datetime | None = None) -> bool:
        return expires_at is None or expires_at - (now or datetime.now(UTC)) > self.margin

    async def access_token(self, view: ConnectionView, *, key: DataKey | None = None) -> AccessToken:
        """A valid access token for the connection: the stored one, or a refreshed one.

        ``key`` is the tenant's data key when the caller already has it (the proxy reads it in
        its single query); otherwise it is loaded.
        """
        if view.status != ACTIVE or view.access_token_ct is None:
            raise _unusable(view)
        if self.fresh_enough(view.access_expires_at):
            return AccessToken(open_access_token(view, key or await self._key(view)), view.version, view.access_expires_at)
        return await self._single_flight(view.id, seen_version=view.version, force=False)

    async def force_refresh(self, connection_id: uuid.UUID, *, seen_version: int) -> AccessToken:
        """Refresh even a token we believe valid (Salesmsg refused it: ``proxy.upstream``), unless
        someone already replaced the token of ``seen_version``."""
        return await self._single_flight(connection_id, seen_version=seen_version, force=True)

    async def refresh_leased(self, view: ConnectionView) -> AccessToken:
        """For the sweep, which took the lease with its batch: refresh under this process's single flight."""
        running = self._inflight.get(view.id)
        if running is not None:
            await self.release(view.id)
            return await asyncio.shield(running)
        return await self._start(view.id, self._refresh_holding_lease(view, seen_version=view.version, force=False))

    async def release(self, connection_id: uuid.UUID) -> None:
        await transitions.release_lease(self.db, connection_id, owner=self.owner)

    # -- in this process and across processes ---------------------------------------------

    async def _single_flight(self, connection_id: uuid.UUID, *, seen_version: int, force: bool) -> AccessToken:
        running = self._inflight.get(connection_id)
        if running is not None:
            return await asyncio.shield(running)
        return await self._start(connection_id, self._refresh(connection_id, seen_version=seen_version, force=force))

    async def _start(self, connection_id: uuid.UUID, work: Coroutine[Any, Any, AccessToken]) -> AccessToken:
        task = asyncio.get_running_loop().create_task(self._traced(connection_id, work))
        self._inflight[connection_id] = task
        task.add_done_callback(lambda _t: self._inflight.pop(connection_id, None))
        return await asyncio.shield(task)

    @staticmethod
    async def _traced(connection_id: uuid.UUID, work: Coroutine[Any, Any, AccessToken]) -> AccessToken:
        """One refresh, as the span ``salesmsg.refresh``; the steps below name its outcome."""
        with tracing.span("salesmsg.refresh", {"smc.connection_id": str(connection_id)}):
            try:
                return await work
            except AppError:
                raise  # refused on purpose: the outcome is set
            except Exception:
                _outcome("error")
                raise

    async def _refresh(self, connection_id: uuid.UUID, *, seen_version: int, force: bool) -> AccessToken:
        deadline = time.monotonic() + self.lease.total_seconds() + self.call_timeout
        while True:
            view = await transitions.take_lease(self.db, connection_id, owner=self.owner, lease=self.lease)
            if view is not None:
                return await self._refresh_holding_lease(view, seen_version=seen_version, force=force)
            current = await read_view(self.db, connection_id)
            if current is None or current.status != ACTIVE or current.access_token_ct is None:
                _outcome("unusable", current)
                raise _unusable(current)
            if current.version != seen_version and self.fresh_enough(current.access_expires_at):
                _outcome("not_needed", current)  # another process refreshed it
                return await self._token_of(current)
            if time.monotonic() > deadline:
                _outcome("lease_busy", current)
                return await self._fallback(current)
            await asyncio.sleep(_POLL_SECONDS * (0.5 + random.random()))

    async def _refresh_holding_lease(self, view: ConnectionView, *, seen_version: int, force: bool) -> AccessToken:
        lease_ends = time.monotonic() + self.lease.total_seconds()  # taken just now (or by the sweep's batch)
        now = datetime.now(UTC)
        already_done = view.version != seen_version and (force or self.fresh_enough(view.access_expires_at, now))
        if already_done or (not force and self.fresh_enough(view.access_expires_at, now)):
            _outcome("not_needed", view)
            await self.release(view.id)
            return await self._token_of(view)
        if not force and view.next_refresh_at is not None and view.next_refresh_at > now:
            _outcome("cooling_down", view)
            await self.release(view.id)  # cooling down after transient failures
            return await self._fallback(view)
        key = await self._key(view)
        refresh_token = open_refresh_token(view, key)
        if view.kind != PAT and refresh_token is None:
            _outcome("dead", view)
            await self._dead(view, "no_refresh_token")
            raise ConnectionNeedsReauth()
        started = time.perf_counter()
        try:
            if view.kind == PAT:
                answer = await token_client.refresh_pat(self.http, self.settings, token=open_access_token(view, key),
                                                        timeout=self.call_timeout)
            else:
                assert refresh_token is not None
                answer = await token_client.refresh_oauth(self.http, self.settings, refresh_token=refresh_token,
                                                          timeout=self.call_timeout)
        except TokenEndpointError as exc:
            REFRESH_SECONDS.observe(time.perf_counter() - started)
            if exc.transient or exc.kind == "invalid":
                REFRESHES.labels("transient").inc()
                _outcome("transient", view)
                return await self._transient(view, exc)
            REFRESHES.labels("dead").inc()
            _outcome("dead", view)
            await self._dead(view, exc.reason)
            raise ConnectionNeedsReauth() from exc
        REFRESH_SECONDS.observe(time.perf_counter() - started)
        REFRESHES.labels("success").inc()
        _outcome("success", view)
        return await self._store(view, key, answer, refresh_token, lease_ends=lease_ends)

    # -- pieces ---------------------------------------------------------------------------

    async def _key(self, view: ConnectionView) -> DataKey:
        async with self.db.sessionmaker() as session:
            return await load_data_key(session, self.data_keys, view.tenant_id)

    async def _token_of(self, view: ConnectionView) -> AccessToken:
        if view.access_token_ct is None:
            raise NotConnected()
        return AccessToken(open_access_token(view, await self._key(view)), view.version, view.access_expires_at)

    async def _fallback(self, view: ConnectionView) -> AccessToken:
        """No fresh token now: the current one while it has not expired, else 503."""
        if view.access_token_ct is not None and (view.access_expires_at is None or view.access_expires_at > datetime.now(UTC)):
            return await self._token_of(view)
        retry = "5"
        if view.next_refresh_at is not None:
            retry = str(max(1, int((view.next_refresh_at - datetime.now(UTC)).total_seconds())))
        raise RefreshUnavailable(headers={"Retry-After": retry})

    async def _store(self, view: ConnectionView, key: DataKey, answer: TokenResponse, old_refresh: str | None, *,
                     lease_ends: float) -> AccessToken:
        """Write what Salesmsg answered. Salesmsg has already rotated the refresh token, so losing
        this write loses the grant: while the database is briefly away, keep trying, with backoff
        and every attempt bounded, until a safety margin before our lease ends (after that another
        process may take the lease and refresh with the token Salesmsg has retired)."""
        give_up = min(time.monotonic() + _STORE_RETRY_SECONDS, lease_ends - min(5.0, self.lease.total_seconds() / 4))
        delay = 0.1
        while True:
            try:
                async with asyncio.timeout(max(2.0, give_up - time.monotonic())):
                    return await self._store_once(view, key, answer, old_refresh)
            except Exception as exc:
                if not is_database_unavailable(exc) or time.monotonic() + delay > give_up:
                    raise
                log.warning("refreshed tokens not stored yet: database unavailable; retrying",
                            connection_id=str(view.id), retry_in=round(delay, 2))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _store_once(self, view: ConnectionView, key: DataKey, answer: TokenResponse, old_refresh: str | None) -> AccessToken:
        expires_in = answer.expires_in or (_PAT_LIFETIME if view.kind == PAT else None)
        expires_at = datetime.now(UTC) + timedelta(seconds=expires_in) if expires_in else None
        stored = await transitions.refreshed(
            self.db, view, owner=self.owner, key=key, access_token=answer.access_token,
            refresh_token=answer.refresh_token or old_refresh,  # Salesmsg may omit it: keep the old one
            expires_at=expires_at, rotated=answer.refresh_token is not None,
        )
        if not stored:
            log.warning("refresh result discarded: connection changed meanwhile", connection_id=str(view.id))
            _outcome("superseded", view)
            current = await read_view(self.db, view.id)
            if current is None or current.status != ACTIVE:
                raise NotConnected()
            return await self._token_of(current)
        log.info("token refreshed", connection_id=str(view.id), kind=view.kind, version=view.version + 1)
        return AccessToken(answer.access_token, view.version + 1, expires_at)

    async def _dead(self, view: ConnectionView, reason: str) -> None:
        if await transitions.dead(self.db, view, reason=reason):
            log.warning("connection needs reauth", connection_id=str(view.id), reason=reason)

    async def _transient(self, view: ConnectionView, exc: TokenEndpointError) -> AccessToken:
        failures = view.refresh_failures + 1
        give_up = failures >= self.settings.refresh_max_failures
        cooldown = jittered(failures, base=self.settings.refresh_backoff_base_seconds,
                            cap=self.settings.refresh_backoff_max_seconds)
        if exc.retry_after is not None:  # Salesmsg said how long: never come back sooner
            cooldown = max(cooldown, min(exc.retry_after, self.settings.refresh_backoff_max_seconds))
        now_view = await transitions.refresh_failed(self.db, view, owner=self.owner, reason=exc.reason,
                                                    cooldown=cooldown, give_up=give_up)
        log.warning("refresh failed", connection_id=str(view.id), reason=exc.reason, failures=failures)
        if give_up:
            _outcome("dead", view)
            raise ConnectionNeedsReauth()
        return await self._fallback(now_view)


async def refresh_due(refresher: Refresher, *, batch: int, concurrency: int) -> dict[str, int]:
    """One sweep: lease a batch of due connections, refresh them with bounded concurrency."""
    counts = {"leased": 0, "refreshed": 0, "failed": 0}
    async with refresher.db.session() as session:
        views = await transitions.lease_due(session, owner=refresher.owner, lease=refresher.lease, margin=refresher.margin,
                                     limit=batch)
    counts["leased"] = len(views)
    gate = asyncio.Semaphore(concurrency)

    async def one(view: ConnectionView) -> None:
        async with gate:
            try:
                await refresher.refresh_leased(view)
                counts["refreshed"] += 1
            except AppError:
                counts["failed"] += 1
            except Exception:  # noqa: BLE001 - one bad row must not stop the sweep
                counts["failed"] += 1
                log.exception("refresh crashed", connection_id=str(view.id))
                await refresher.release(view.id)

    await asyncio.gather(*(one(v) for v in views))
    return counts
