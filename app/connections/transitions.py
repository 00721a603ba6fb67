"""Every write to a connection row: its state changes, each with its event and audit record, and
the refresh lease.

| transition | status after | what else changes | event (webhook) | audit |
| --- | --- | --- | --- | --- |
| ``take_lease`` / ``lease_due`` | (active only) | lease owner and expiry, if free or run out | | |
| ``release_lease`` | unchanged | lease cleared, if still ours | | |
| ``connected`` | active | new tokens, version + 1, failures and lease cleared, who and which org | connected (+ org_changed, org_shared) | connection.connect |
| ``refreshed`` | active | new tokens (compare-and-swap on version and lease owner), failures and lease cleared | refreshed (+ recovered after failures) | |
| ``refresh_failed`` | active; needs_reauth after the last allowed failure | failures + 1, cooldown, lease released | refresh_failed (+ needs_reauth) | connection.needs_reauth when given up |
| ``dead`` | needs_reauth (compare-and-swap on version) | lease released | needs_reauth | connection.needs_reauth |
| ``disconnected`` | disconnected | tokens shredded, version + 1, lease released | disconnected | connection.disconnect |

A connect whose Salesmsg org differs from the one the row last held (the org id stays on the row
across a disconnect) emits ``org_changed``; one whose org another tenant's live connection holds
emits ``org_shared``, whose payload counts the other tenants without naming them (the audit row
keeps their slugs). Neither blocks the connect: an operator decides, warned on the tenant page.

Each runs in one transaction, so a change and its event and audit row land together or not at
all. Tokens are sealed here under the tenant's data key, bound to the connection and the field.

The lease is an owner and an expiry on the row, taken with one conditional UPDATE that commits at
once, so no transaction stays open across the call to Salesmsg. The sweep leases a whole batch of
due connections in one statement, skipping rows another worker has locked (``FOR UPDATE SKIP
LOCKED`` on PostgreSQL).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import audit_log
from app.audit.audit_log import ACTOR_LINK, Actor
from app.connections import events, scopes
from app.connections.store import get_connection, require_connection
from app.connections.view import ACTIVE, COLUMNS, DISCONNECTED, NEEDS_REAUTH, ConnectionView
from app.core.db import Database
from app.core.models import Connection, ConnectLink, Tenant, WebSession
from app.tenants.registry import tenants_holding_org
from app.vault.envelope import DataKey

HEALTHY = {"refresh_failures": 0, "next_refresh_at": None, "last_error": None}
LEASE_FREE = {"lease_owner": None, "lease_expires_at": None}


def _seal(key: DataKey, connection_id: uuid.UUID, *, access_token: str, refresh_token: str | None) -> dict[str, Any]:
    return {
        "access_token_ct": key.seal(access_token, owner=connection_id, field="access_token"),
        "refresh_token_ct": key.seal(refresh_token, owner=connection_id, field="refresh_token") if refresh_token else None,
    }


def _expiry(expires_in: int | None, now: datetime) -> datetime | None:
    return now + timedelta(seconds=expires_in) if expires_in else None


async def _update(session: AsyncSession, connection_id: uuid.UUID, *conditions: Any, **values: Any) -> bool:
    """One conditional UPDATE of the row; True when it matched."""
    result = await session.execute(
        update(Connection).where(Connection.id == connection_id, *conditions).values(**values)
        .execution_options(synchronize_session=False)
    )
    return cast(CursorResult[Any], result).rowcount == 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Profile:
    """Who connected, at Salesmsg, and which org (best effort; shown on the tenant page)."""

    salesmsg_user: str | None = None
    salesmsg_user_id: str | None = None
    salesmsg_org: str | None = None
    salesmsg_org_id: str | None = None


async def _link_sender(session: AsyncSession, actor: Actor) -> str | None:
    """Who sent the connect link a link actor came in through (its id is the link's id, or the
    prefix of the browser session the link started)."""
    if actor.type != ACTOR_LINK or not actor.id:
        return None
    try:
        return await session.scalar(select(ConnectLink.created_by).where(ConnectLink.id == uuid.UUID(actor.id)))
    except ValueError:
        pass
    if not actor.id.isalnum():
        return None
    return await session.scalar(
        select(ConnectLink.created_by).join(WebSession, WebSession.link_id == ConnectLink.id)
        .where(WebSession.id.startswith(actor.id)).limit(1)
    )


async def connected(
    session: AsyncSession,
    *,
    tenant: Tenant,
    key: DataKey,
    kind: str,
    access_token: str,
    refresh_token: str | None,
    expires_in: int | None,
    granted_scopes: list[str],
    actor: Actor,
    profile: Profile = Profile(),
    request_id: str | None = None,
) -> tuple[Connection, bool]:
    """Create the tenant's connection, or give the existing one new tokens (a reconnect).

    Returns the connection and whether it existed before.
    """
    conn = await get_connection(session, tenant.id)
    existed = conn is not None
    # read before the row is overwritten: the org this tenant held last (kept across a disconnect)
    before = {"id": conn.salesmsg_org_id, "name": conn.salesmsg_org} if conn is not None else None
    now = datetime.now(UTC)
    if conn is None:
        conn = Connection(id=uuid.uuid4(), tenant_id=tenant.id, version=1)
        session.add(conn)
    else:
        conn.version = conn.version + 1
    values: dict[str, Any] = {
        "kind": kind,
        "status": ACTIVE,
        "scopes": scopes.format_scopes(granted_scopes),
        **_seal(key, conn.id, access_token=access_token, refresh_token=refresh_token),
        "access_expires_at": _expiry(expires_in, now),
        **LEASE_FREE,
        **HEALTHY,
        "last_refresh_at": None,
        "connected_at": now,
        "connected_by": actor.id or actor.type,
        "disconnected_at": None,
        "salesmsg_user": profile.salesmsg_user,
        "salesmsg_user_id": profile.salesmsg_user_id,
        "salesmsg_org": profile.salesmsg_org,
        "salesmsg_org_id": profile.salesmsg_org_id,
    }
    for name, value in values.items():
        setattr(conn, name, value)
    await session.flush()
    details: dict[str, Any] = {"kind": kind, "scopes": granted_scopes, "reconnect": existed, "by": actor.type}
    await events.emit(session, tenant_id=tenant.id, connection_id=conn.id, type="connected", data=details)
    audit_details: dict[str, Any] = dict(details)
    sender = await _link_sender(session, actor)
    if sender:
        audit_details["link_sent_by"] = sender
    org_id = profile.salesmsg_org_id
    if org_id:
        audit_details["salesmsg_org_id"] = org_id
        now_org = {"id": org_id, "name": profile.salesmsg_org}
        if before is not None and before["id"] and before["id"] != org_id:
            await events.emit(session, tenant_id=tenant.id, connection_id=conn.id, type="org_changed",
                              data={"from": before, "to": now_org})
            audit_details["org_changed"] = {"from": before["id"], "to": org_id}
        holders = [t.slug for t in await tenants_holding_org(session, org_id, besides=tenant.id)]
        if holders:
            # The event goes to the tenant's webhook and API keys: it counts the other tenants but
            # never names them. The audit row (operators only) keeps their slugs.
            await events.emit(session, tenant_id=tenant.id, connection_id=conn.id, type="org_shared",
                              data={"org": now_org, "other_tenants": len(holders)})
            audit_details["org_shared"] = holders
    await audit_log.record(session, "connection.connect", actor, tenant_id=tenant.id, target=tenant.slug,
                           request_id=request_id, details=audit_details)
    return conn, existed


async def disconnected(session: AsyncSession, *, tenant: Tenant, actor: Actor, request_id: str | None = None) -> Connection:
    """Shred the connection's tokens and mark it disconnected."""
    conn = await require_connection(session, tenant.id)
    values: dict[str, Any] = {
        "access_token_ct": None,
        "refresh_token_ct": None,
        "access_expires_at": None,
        "status": DISCONNECTED,
        "disconnected_at": datetime.now(UTC),
        **LEASE_FREE,
        "version": conn.version + 1,
    }
    for name, value in values.items():
        setattr(conn, name, value)
    await session.flush()
    await events.emit(session, tenant_id=tenant.id, connection_id=conn.id, type="disconnected", data={"by": actor.type})
    await audit_log.record(session, "connection.disconnect", actor, tenant_id=tenant.id, target=tenant.slug,
                           request_id=request_id)
    return conn


async def refreshed(
    db: Database,
    view: ConnectionView,
    *,
    owner: str,
    key: DataKey,
    access_token: str,
    refresh_token: str | None,
    expires_at: datetime | None,
    rotated: bool,
) -> bool:
    """Store refreshed tokens if the row is still the version we refreshed and our lease holds.

    False when it was reconnected or disconnected meanwhile: those tokens belong to a grant that
    is no longer this connection's, and are dropped.
    """
    async with db.session() as session:
        stored = await _update(
            session, view.id, Connection.version == view.version, Connection.lease_owner == owner,
            **_seal(key, view.id, access_token=access_token, refresh_token=refresh_token),
            access_expires_at=expires_at, version=view.version + 1, last_refresh_at=datetime.now(UTC),
            **HEALTHY, **LEASE_FREE,
        )
        if not stored:
            return False
        await events.emit(session, tenant_id=view.tenant_id, connection_id=view.id, type="refreshed",
                          data={"expires_at": expires_at.isoformat() if expires_at else None, "rotated": rotated})
        if view.refresh_failures:
            await events.emit(session, tenant_id=view.tenant_id, connection_id=view.id, type="recovered",
                              data={"after_failures": view.refresh_failures})
    return True


async def _needs_reauth(session: AsyncSession, view: ConnectionView, reason: str, data: dict[str, Any]) -> None:
    await events.emit(session, tenant_id=view.tenant_id, connection_id=view.id, type="needs_reauth", data=data)
    await audit_log.record(session, "connection.needs_reauth", Actor.system(), outcome="failure",
                           tenant_id=view.tenant_id, target=str(view.id), details={"reason": reason})


async def dead(db: Database, view: ConnectionView, *, reason: str) -> bool:
    """The grant is gone: needs_reauth, unless someone refreshed or reconnected meanwhile (then
    their state stands and False is returned)."""
    async with db.session() as session:
        if not await _update(session, view.id, Connection.version == view.version,
                             status=NEEDS_REAUTH, last_error=reason[:200], next_refresh_at=None, **LEASE_FREE):
            return False
        await _needs_reauth(session, view, reason, {"reason": reason})
    return True


async def refresh_failed(
    db: Database, view: ConnectionView, *, owner: str, reason: str, cooldown: float, give_up: bool
) -> ConnectionView:
    """A transient failure: count it, cool down for ``cooldown`` seconds, release the lease; after
    the last allowed failure (``give_up``) the connection needs reauth. Returns the view as now."""
    failures = view.refresh_failures + 1
    next_refresh_at = datetime.now(UTC) + timedelta(seconds=cooldown)
    values: dict[str, Any] = {"refresh_failures": failures, "next_refresh_at": next_refresh_at,
                              "last_error": reason[:200], **LEASE_FREE}
    if give_up:
        values["status"] = NEEDS_REAUTH
    async with db.session() as session:
        await _update(session, view.id, Connection.lease_owner == owner, **values)
        await events.emit(session, tenant_id=view.tenant_id, connection_id=view.id, type="refresh_failed",
                          data={"reason": reason, "failures": failures})
        if give_up:
            await _needs_reauth(session, view, "too_many_failures", {"reason": "too_many_failures", "failures": failures})
    return replace(view, refresh_failures=failures, next_refresh_at=next_refresh_at, status=values.get("status", view.status))


# -- the refresh lease: one refresher at a time, across every process ------------------------


def _free_or_expired(now: datetime) -> ColumnElement[bool]:
    return or_(Connection.lease_owner.is_(None), Connection.lease_expires_at < now)


async def take_lease(db: Database, connection_id: uuid.UUID, *, owner: str, lease: timedelta) -> ConnectionView | None:
    """The connection with its lease now ours, or None (inactive, or leased by someone else)."""
    now = datetime.now(UTC)
    async with db.session() as session:
        result = await session.execute(
            update(Connection)
            .where(Connection.id == connection_id, Connection.status == ACTIVE, _free_or_expired(now))
            .values(lease_owner=owner, lease_expires_at=now + lease)
            .returning(*COLUMNS)
            .execution_options(synchronize_session=False)
        )
        row = result.first()
    return ConnectionView.of_row(row) if row is not None else None


async def release_lease(db: Database, connection_id: uuid.UUID, *, owner: str) -> None:
    """Give the lease back, if it is still ours."""
    async with db.session() as session:
        await session.execute(
            update(Connection)
            .where(Connection.id == connection_id, Connection.lease_owner == owner)
            .values(LEASE_FREE)
            .execution_options(synchronize_session=False)
        )


async def lease_due(
    session: AsyncSession, *, owner: str, lease: timedelta, margin: timedelta, limit: int
) -> list[ConnectionView]:
    """Lease up to ``limit`` active connections whose token expires within ``margin`` and that
    are not cooling down after a failure, soonest first."""
    now = datetime.now(UTC)
    due = (
        select(Connection.id)
        .where(
            Connection.status == ACTIVE,
            Connection.access_expires_at.is_not(None),
            Connection.access_expires_at < now + margin,
            or_(Connection.next_refresh_at.is_(None), Connection.next_refresh_at <= now),
            _free_or_expired(now),
        )
        .order_by(Connection.access_expires_at)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        due = due.with_for_update(skip_locked=True)
    result = await session.execute(
        update(Connection)
        .where(Connection.id.in_(due.scalar_subquery()))
        .values(lease_owner=owner, lease_expires_at=now + lease)
        .returning(*COLUMNS)
        .execution_options(synchronize_session=False)
    )
    return [ConnectionView.of_row(r) for r in result.all()]
