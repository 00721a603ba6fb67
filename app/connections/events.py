"""Connection events (connected, refreshed, refresh_failed, needs_reauth, recovered, disconnected).

An event is stored in the same transaction as the change it reports; when the tenant has a
webhook URL, a delivery row is queued beside it and the webhook sender delivers it later.
Payloads carry ids, states and error classes, never a token.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.models import ConnectionEvent, Tenant, WebhookDelivery

EVENT_TYPES = frozenset({"connected", "refreshed", "refresh_failed", "needs_reauth", "recovered", "disconnected"})


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
