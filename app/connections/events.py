"""Connection events (connected, refreshed, refresh_failed, needs_reauth, recovered, disconnected,
and the warnings org_changed and org_shared a connect can carry).

An event is stored in the same transaction as the change it reports; when the tenant has a
webhook URL, a delivery row is queued beside it and the webhook sender delivers it later.
Payloads carry ids, states and error classes, never a token, and never another tenant's slug or
name: they reach the tenant's webhook and any API key that covers the tenant.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.models import ConnectionEvent, Tenant, WebhookDelivery

EVENT_TYPES = frozenset({
    "connected", "refreshed", "refresh_failed", "needs_reauth", "recovered", "disconnected", "org_changed", "org_shared",
})
# Events an operator should look at: a connect to another Salesmsg org than before, or to one another tenant holds.
WARNING_TYPES = frozenset({"org_changed", "org_shared"})


async def emit(
    session: AsyncSession,
    *,
    tenant_id: uuid.UUID,
    connection_id: uuid.UUID | None,
    type: str,
    data: dict[str, Any] | None = None,
) -> ConnectionEvent:
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type!r}")
    tenant = await session.get(Tenant, tenant_id)
    now = datetime.now(UTC)
    event = ConnectionEvent(
        tenant_id=tenant_id,
        connection_id=connection_id,
        type=type,
        payload={
            "type": type,
            "tenant": {"id": str(tenant_id), "slug": tenant.slug if tenant else None},
            "connection_id": str(connection_id) if connection_id else None,
            "occurred_at": now.isoformat(),
            "data": data or {},
        },
        created_at=now,
    )
    session.add(event)
    await session.flush()
    event.payload = {"id": event.id, **event.payload}
    if tenant is not None and tenant.webhook_url:
        session.add(WebhookDelivery(event_id=event.id, tenant_id=tenant_id, url=tenant.webhook_url, next_attempt_at=now))
    await session.flush()
    return event


async def recent(session: AsyncSession, *, tenant_id: uuid.UUID, limit: int = 20, before_id: int | None = None) -> list[ConnectionEvent]:
    query = select(ConnectionEvent).where(ConnectionEvent.tenant_id == tenant_id)
    if before_id is not None:
        query = query.where(ConnectionEvent.id < before_id)
    return list((await session.scalars(query.order_by(ConnectionEvent.id.desc()).limit(limit))).all())


@dataclass
class EventPage:
    rows: list[ConnectionEvent]
    next_before: int | None  # pass as ``before_id`` for the older page; None on the last page


async def page(session: AsyncSession, *, tenant_id: uuid.UUID, limit: int = 20, before_id: int | None = None) -> EventPage:
    """A page of the tenant's events, newest first, and where the older page starts."""
    rows = await recent(session, tenant_id=tenant_id, limit=limit + 1, before_id=before_id)
    kept = rows[:limit]
    return EventPage(kept, kept[-1].id if len(rows) > limit else None)


async def warnings_since_connect(session: AsyncSession, *, tenant_id: uuid.UUID) -> list[ConnectionEvent]:
    """The warnings the tenant's latest connect carried (none once it connects again without them)."""
    last = await session.scalar(
        select(ConnectionEvent.id).where(ConnectionEvent.tenant_id == tenant_id, ConnectionEvent.type == "connected")
        .order_by(ConnectionEvent.id.desc()).limit(1)
    )
    if last is None:
        return []
    query = select(ConnectionEvent).where(
        ConnectionEvent.tenant_id == tenant_id, ConnectionEvent.id > last, ConnectionEvent.type.in_(WARNING_TYPES)
    )
    return list((await session.scalars(query.order_by(ConnectionEvent.id))).all())
