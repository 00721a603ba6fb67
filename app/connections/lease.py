"""The refresh lease on a connection row: one refresher at a time across every process.

A lease is an owner and an expiry on the row, taken with one conditional UPDATE that commits at
once (no transaction stays open across the call to Salesmsg): the row must be active and its
lease free or run out. The sweep leases a whole batch of due connections in one statement,
skipping rows another worker has locked (``FOR UPDATE SKIP LOCKED`` on PostgreSQL).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.connections.view import ACTIVE, COLUMNS, ConnectionView
from app.core.db import Database
from app.core.models import Connection

FREE = {"lease_owner": None, "lease_expires_at": None}


def _free_or_expired(now: datetime):  # noqa: ANN202 - a SQL expression
    return or_(Connection.lease_owner.is_(None), Connection.lease_expires_at < now)


async def take(db: Database, connection_id: uuid.UUID, *, owner: str, lease: timedelta) -> ConnectionView | None:
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


async def release(db: Database, connection_id: uuid.UUID, *, owner: str) -> None:
    """Give the lease back, if it is still ours."""
    async with db.session() as session:
        await session.execute(
            update(Connection)
            .where(Connection.id == connection_id, Connection.lease_owner == owner)
            .values(FREE)
            .execution_options(synchronize_session=False)
        )


async def take_due(
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
