"""One view of a connection, built by keyword, that the gate, the refresh engine and the
upstream call all take.

The proxy builds it from its single lookup query, the dashboard from the ORM row, the refresh
engine from its lease ``UPDATE ... RETURNING``. ``TenantAccess`` adds what the HIPAA policy reads
of the tenant (its HIPAA flag and BAA), from the same database read as the connection.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row

from app.core.models import Connection, Tenant

ACTIVE = "active"
NEEDS_REAUTH = "needs_reauth"
DISCONNECTED = "disconnected"
OAUTH = "oauth"
PAT = "pat"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionView:
    id: uuid.UUID
    tenant_id: uuid.UUID
    kind: str
    status: str
    version: int
    scopes: str
    access_token_ct: bytes | None
    access_expires_at: datetime | None
    # read by the refresh engine (its lease query returns them); the proxy's lookup leaves them out
    refresh_token_ct: bytes | None = None
    refresh_failures: int = 0
    next_refresh_at: datetime | None = None

    @classmethod
    def of(cls, conn: Connection) -> ConnectionView:
        return cls(**{name: getattr(conn, name) for name in _FIELDS})

    @classmethod
    def of_row(cls, row: Row[Any]) -> ConnectionView:
        """From a row of ``select(*COLUMNS)`` (or ``RETURNING *COLUMNS``)."""
        return cls(**row._mapping)


_FIELDS = tuple(ConnectionView.__dataclass_fields__)
COLUMNS = tuple(getattr(Connection, name) for name in _FIELDS)


@dataclass(frozen=True, slots=True, kw_only=True)
class TenantAccess:
    """A tenant's HIPAA flag, BAA and connection, as read from the database for this request."""

    tenant_id: uuid.UUID
    hipaa: bool
    baa_signed_at: datetime | None
    connection: ConnectionView | None

    @classmethod
    def of(cls, tenant: Tenant, conn: Connection | None) -> TenantAccess:
        return cls(tenant_id=tenant.id, hipaa=tenant.hipaa, baa_signed_at=tenant.baa_signed_at,
                   connection=ConnectionView.of(conn) if conn is not None else None)
