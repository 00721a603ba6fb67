"""Reading a tenant's connection to Salesmsg, and opening the tokens it holds sealed in the vault.

Every write to a connection row (its state, its tokens, the refresh lease) is in ``transitions``. Tokens are sealed under the tenant's data key, bound to the connection and the field.
"""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.connections.view import COLUMNS, ConnectionView
from app.core.db import Database
from app.core.errors import NotFound
from app.core.models import Connection
from app.vault.envelope import DataKey


async def get_connection(session: AsyncSession, tenant_id: uuid.UUID) -> Connection | None:
    return await session.scalar(select(Connection).where(Connection.tenant_id == tenant_id))


async def require_connection(session: AsyncSession, tenant_id: uuid.UUID) -> Connection:
    conn = await get_connection(session, tenant_id)
    if conn is None:
        raise NotFound("This tenant has no connection.", code="not_connected")
    return conn


async def read_view(db: Database, connection_id: uuid.UUID) -> ConnectionView | None:
    """The connection as it is now, in a read of its own (no transaction left open)."""
    async with db.sessionmaker() as session:
        row = (await session.execute(select(*COLUMNS).where(Connection.id == connection_id))).first()
    return ConnectionView.of_row(row) if row is not None else None


def open_access_token(conn: Connection | ConnectionView, key: DataKey) -> str:
    if conn.access_token_ct is None:
        raise NotFound("This connection holds no token.", code="not_connected")
    return key.open_text(conn.access_token_ct, owner=conn.id, field="access_token")


def open_refresh_token(conn: Connection | ConnectionView, key: DataKey) -> str | None:
    if conn.refresh_token_ct is None:
        return None
    return key.open_text(conn.refresh_token_ct, owner=conn.id, field="refresh_token")
