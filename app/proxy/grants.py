"""The proxy's one database round trip: the API key, the tenant, its BAA state, its connection
and its wrapped data key, in a single query.

On PostgreSQL a complete grant is kept in this process's ``GrantCache`` while its invalidation
channel proves it fresh (``grant_cache``: this process's own changes at once, every other
process's within 100 ms, bypassed while the channel is down). On SQLite nothing is cached: a
revoked key or BAA, a disconnect or a refresh takes effect on the next request. The query runs as SQL text on asyncpg itself,
on a connection checked out of SQLAlchemy's pool: one round trip (a prepared statement asyncpg
caches per connection), where SQLAlchemy's autobegin would add BEGIN and ROLLBACK around it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

import asyncpg
from sqlalchemy import Select, and_, bindparam, exists, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection

from app.connections.view import ConnectionView, TenantAccess
from app.core.db import Database
from app.core.errors import UNAVAILABLE_SQLSTATES
from app.core.models import ApiKey, ApiKeyTenant, Connection, Tenant, TenantKey
from app.core.tracing import db_span
from app.proxy.grant_cache import GrantCache
from app.tenants.registry import SLUG

_PREFIX: Any = bindparam("prefix")
_SLUG: Any = bindparam("slug")
_TENANT_ID: Any = bindparam("tenant_id")


@dataclass(slots=True)
class Grant:
    """One row of the lookup, in the query's column order. The tenant and connection columns are
    None when the key exists but names no tenant the reference matches."""

    key_id: uuid.UUID
    key_hash: str
    all_tenants: bool
    read_only: bool
    revoked_at: datetime | None
    last_used_at: datetime | None
    tenant_id: uuid.UUID | None
    slug: str | None
    hipaa: bool | None
    baa_signed_at: datetime | None
    covered: bool
    conn_id: uuid.UUID | None
    kind: str | None
    status: str | None
    scopes: str | None
    version: int | None
    access_token_ct: bytes | None
    access_expires_at: datetime | None
    data_key_id: uuid.UUID | None
    master_key_id: str | None
    wrapped_key: bytes | None

    def access(self) -> TenantAccess:
        """What the HIPAA policy and the refresh engine read (call once the tenant is known)."""
        assert self.tenant_id is not None
        conn = None
        if self.conn_id is not None:
            conn = ConnectionView(
                id=self.conn_id, tenant_id=self.tenant_id, kind=self.kind or "", status=self.status or "",
                version=self.version or 0, scopes=self.scopes or "", access_token_ct=self.access_token_ct,
                access_expires_at=self.access_expires_at,
            )
        # a NULL hipaa cannot come from the table (NOT NULL, default true); read it as HIPAA anyway
        return TenantAccess(tenant_id=self.tenant_id, hipaa=self.hipaa is not False, baa_signed_at=self.baa_signed_at,
                            connection=conn)


def _statement(*, by_id: bool) -> Select[*tuple[Any, ...]]:
    tenant_match = Tenant.id == _TENANT_ID if by_id else Tenant.slug == _SLUG
    covered = exists().where(and_(ApiKeyTenant.api_key_id == ApiKey.id, ApiKeyTenant.tenant_id == Tenant.id))
    return (
        select(
            ApiKey.id, ApiKey.key_hash, ApiKey.all_tenants, ApiKey.read_only, ApiKey.revoked_at, ApiKey.last_used_at,
            Tenant.id, Tenant.slug, Tenant.hipaa, Tenant.baa_signed_at, covered.label("covered"),
            Connection.id, Connection.kind, Connection.status, Connection.scopes, Connection.version,
            Connection.access_token_ct, Connection.access_expires_at,
            TenantKey.id, TenantKey.master_key_id, TenantKey.wrapped_key,
        )
        .select_from(ApiKey)
        .outerjoin(Tenant, tenant_match)
        .outerjoin(Connection, Connection.tenant_id == Tenant.id)
        .outerjoin(TenantKey, TenantKey.tenant_id == Tenant.id)
        .where(ApiKey.prefix == _PREFIX)
    )


class GrantLookup:
    """Built once per process; ``find`` is the per-request lookup (a cache hit or one round trip)."""

    def __init__(self, db: Database, *, cache: GrantCache | None = None) -> None:
        self.db = db
        self.cache = cache
        self.statements = {False: _statement(by_id=False), True: _statement(by_id=True)}
        self.raw_sql: dict[bool, tuple[str, tuple[str, ...]]] | None = None
        if db.is_postgres:
            self.raw_sql = {}
            for by_id, statement in self.statements.items():
                compiled = statement.compile(dialect=db.engine.dialect)
                self.raw_sql[by_id] = (str(compiled), tuple(compiled.positiontup or ()))

    async def find(self, prefix: str, tenant_ref: str) -> Grant | None:
        """The key with this lookup prefix and the tenant it names by id or slug (if any)."""
        cache = self.cache
        generation = 0
        if cache is not None:
            cached = cache.get((prefix, tenant_ref))
            if cached is not None:
                return cached
            generation = cache.generation
        try:
            tenant_id: uuid.UUID | None = uuid.UUID(tenant_ref)
        except ValueError:
            tenant_id = None
        by_id = tenant_id is not None
        slug = tenant_ref.lower()
        if not by_id and not SLUG.fullmatch(slug):
            slug = ""  # matches no tenant (the key is still checked first); a NUL never reaches PostgreSQL
        params: dict[str, Any] = {"prefix": prefix, "tenant_id": tenant_id} if by_id else {"prefix": prefix, "slug": slug}
        async with self.db.engine.connect() as conn:
            if self.raw_sql is None:
                row = (await conn.execute(self.statements[by_id], params)).first()
            else:
                sql, names = self.raw_sql[by_id]
                raw = (await conn.get_raw_connection()).driver_connection
                assert raw is not None
                try:
                    with db_span("SELECT api_keys", sql):
                        row = await raw.fetchrow(sql, *(params[name] for name in names))
                except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                    await self._disconnected(conn, exc)
                except asyncpg.PostgresError as exc:
                    if str(exc.sqlstate or "").startswith(UNAVAILABLE_SQLSTATES):
                        await self._disconnected(conn, exc)
                    raise
        if row is None:
            return None
        grant = Grant(*row)
        if cache is not None and grant.tenant_id is not None and grant.revoked_at is None:
            cache.put((prefix, tenant_ref), grant, generation=generation)
        return grant

    async def _disconnected(self, conn: AsyncConnection, exc: Exception) -> NoReturn:
        """What SQLAlchemy does on a disconnect: every connection pooled before now is stale
        (PostgreSQL restarted), this one is dropped, and the caller gets the documented 503."""
        fairy = await conn.get_raw_connection()
        self.db.engine.sync_engine.pool._invalidate(fairy, exc, _checkin=False)  # pinned SQLAlchemy 2.1
        await conn.invalidate(exc)
        raise OperationalError("proxy grant lookup", None, exc, connection_invalidated=True) from exc
