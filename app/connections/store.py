"""A tenant's connection to Salesmsg: tokens sealed in the vault, scopes, status."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import audit_log
from app.audit.audit_log import Actor
from app.connections import events, scopes
from app.core.errors import NotFound
from app.core.models import Connection, Tenant
from app.vault.envelope import DataKey

ACTIVE = "active"
NEEDS_REAUTH = "needs_reauth"
DISCONNECTED = "disconnected"


def expiry(expires_in: int | None, *, now: datetime | None = None) -> datetime | None:
    if not expires_in:
        return None
    return (now or datetime.now(UTC)) + timedelta(seconds=expires_in)


async def get_connection(session: AsyncSession, tenant_id: uuid.UUID) -> Connection | None:
    return await session.scalar(select(Connection).where(Connection.tenant_id == tenant_id))


async def require_connection(session: AsyncSession, tenant_id: uuid.UUID) -> Connection:
    conn = await get_connection(session, tenant_id)
    if conn is None:
        raise NotFound("This tenant has no connection.", code="not_connected")
    return conn


def seal_tokens(conn: Connection, key: DataKey, *, access_token: str, refresh_token: str | None) -> None:
    conn.access_token_ct = key.seal(access_token, owner=conn.id, field="access_token")
    conn.refresh_token_ct = key.seal(refresh_token, owner=conn.id, field="refresh_token") if refresh_token else None


def open_access_token(conn: Connection, key: DataKey) -> str:
    if conn.access_token_ct is None:
        raise NotFound("This connection holds no token.", code="not_connected")
    return key.open_text(conn.access_token_ct, owner=conn.id, field="access_token")


def open_refresh_token(conn: Connection, key: DataKey) -> str | None:
    if conn.refresh_token_ct is None:
        return None
    return key.open_text(conn.refresh_token_ct, owner=conn.id, field="refresh_token")


async def store_new_grant(
    session: AsyncSession,
    *,
    tenant: Tenant,
    key: DataKey,
    kind: str,
    access_token: str,
    refresh_token: str | None,
    expires_in: int | None,
    granted_scopes: list[str],
    connected_by: str,
    salesmsg_user: str | None = None,
    salesmsg_org: str | None = None,
) -> tuple[Connection, bool]:
    """Create the tenant's connection, or replace the tokens of the existing one (reconnect).

    Returns the connection and whether it existed before.
    """
    conn = await get_connection(session, tenant.id)
    existed = conn is not None
    now = datetime.now(UTC)
    if conn is None:
        conn = Connection(id=uuid.uuid4(), tenant_id=tenant.id, version=1)
        session.add(conn)
    else:
        conn.version = conn.version + 1
    conn.kind = kind
    conn.status = ACTIVE
    conn.scopes = scopes.format_scopes(granted_scopes)
    seal_tokens(conn, key, access_token=access_token, refresh_token=refresh_token)
    conn.access_expires_at = expiry(expires_in, now=now)
    conn.lease_owner = None
    conn.lease_expires_at = None
    conn.refresh_failures = 0
    conn.next_refresh_at = None
    conn.last_error = None
    conn.last_refresh_at = None
    conn.connected_at = now
    conn.connected_by = connected_by
    conn.disconnected_at = None
    conn.salesmsg_user = salesmsg_user
    conn.salesmsg_org = salesmsg_org
    await session.flush()
    return conn, existed


async def disconnect(
    session: AsyncSession, *, tenant: Tenant, actor: Actor, request_id: str | None = None
) -> Connection:
    """Shred the connection's tokens, mark it disconnected, record an event, audit."""
    conn = await require_connection(session, tenant.id)
    conn.access_token_ct = None
    conn.refresh_token_ct = None
    conn.access_expires_at = None
    conn.status = DISCONNECTED
    conn.disconnected_at = datetime.now(UTC)
    conn.lease_owner = None
    conn.lease_expires_at = None
    conn.version = conn.version + 1
    await session.flush()
    await events.emit(session, tenant_id=tenant.id, connection_id=conn.id, type="disconnected", data={"by": actor.type})
    await audit_log.record(session, "connection.disconnect", actor, tenant_id=tenant.id, target=tenant.slug, request_id=request_id)
    return conn
