"""Tenants: one per customer org. HIPAA defaults to on until an operator says otherwise."""

from __future__ import annotations

import base64
import re
import uuid
from dataclasses import dataclass

from sqlalchemy import Select, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import audit_log
from app.audit.audit_log import Actor
from app.core.errors import Conflict, NotFound, ValidationFailed
from app.core.models import Connection, Tenant
from app.vault import tenant_keys
from app.vault.envelope import MasterKeys

SLUG = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
RESERVED_SLUGS = frozenset({"new", "api", "static", "admin", "login", "logout", "connect", "oauth"})


def validate_slug(slug: str) -> str:
    slug = slug.strip().lower()
    if len(slug) < 2 or not SLUG.fullmatch(slug) or "--" in slug or slug in RESERVED_SLUGS:
        raise ValidationFailed(
            "A slug is 2-63 lowercase letters, digits and single hyphens, not starting or ending with one.",
            code="invalid_slug",
            extra={"fields": [{"field": "slug", "problem": "invalid"}]},
        )
    return slug


def validate_name(name: str) -> str:
    name = " ".join(name.split())
    if not 1 <= len(name) <= 200 or any(ord(c) < 32 for c in name):
        raise ValidationFailed(
            "A name is 1-200 printable characters.",
            code="invalid_name",
            extra={"fields": [{"field": "name", "problem": "invalid"}]},
        )
    return name


async def create_tenant(
    session: AsyncSession,
    *,
    keyring: MasterKeys,
    slug: str,
    name: str,
    hipaa: bool = True,
    actor: Actor,
    request_id: str | None = None,
) -> Tenant:
    slug, name = validate_slug(slug), validate_name(name)
    if await session.scalar(select(Tenant.id).where(Tenant.slug == slug)) is not None:
        raise Conflict(f"A tenant with the slug {slug!r} exists.", code="tenant_exists")
    tenant = Tenant(id=uuid.uuid4(), slug=slug, name=name, hipaa=hipaa)
    session.add(tenant)
    try:
        await session.flush()
    except IntegrityError as exc:  # a concurrent create of the same slug
        raise Conflict(f"A tenant with the slug {slug!r} exists.", code="tenant_exists") from exc
    await tenant_keys.create_data_key(session, keyring, tenant.id)
    await audit_log.record(
        session, "tenant.create", actor, tenant_id=tenant.id, target=slug, request_id=request_id,
        details={"hipaa": hipaa},
    )
    return tenant


def _is_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


async def get_tenant(session: AsyncSession, ref: str | uuid.UUID, *, for_update: bool = False) -> Tenant:
    """A tenant by id or slug."""
    tenant_id = ref if isinstance(ref, uuid.UUID) else _is_uuid(ref)
    query = select(Tenant).where(Tenant.id == tenant_id) if tenant_id else select(Tenant).where(Tenant.slug == str(ref).lower())
    if for_update and session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    tenant = await session.scalar(query)
    if tenant is None:
        raise NotFound("No such tenant.", code="tenant_not_found")
    return tenant


@dataclass
class TenantRow:
    tenant: Tenant
    connection: Connection | None


@dataclass
class TenantPage:
    rows: list[TenantRow]
    next_cursor: str | None


def encode_cursor(slug: str) -> str:
    return base64.urlsafe_b64encode(slug.encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> str | None:
    if not cursor:
        return None
    try:
        value = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValidationFailed("The cursor is not valid.", code="invalid_cursor") from exc
    if not SLUG.fullmatch(value):
        raise ValidationFailed("The cursor is not valid.", code="invalid_cursor")
    return value


def _filtered(query: Select, *, search: str | None, tenant_ids: set[uuid.UUID] | None, status: str | None) -> Select:
    if search:
        pattern = "%" + search.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        query = query.where(or_(Tenant.slug.like(pattern, escape="\\"), func.lower(Tenant.name).like(pattern, escape="\\")))
    if tenant_ids is not None:
        query = query.where(Tenant.id.in_(tenant_ids))
    if status == "not_connected":
        query = query.where(or_(Connection.id.is_(None), Connection.status == "disconnected"))
    elif status in ("active", "needs_reauth"):
        query = query.where(Connection.status == status)
    return query


async def list_tenants(
    session: AsyncSession,
    *,
    search: str | None = None,
    cursor: str | None = None,
    limit: int = 50,
    tenant_ids: set[uuid.UUID] | None = None,
    status: str | None = None,
) -> TenantPage:
    """Tenants in slug order with their connection, keyset-paged (one query, index on slug)."""
    limit = max(1, min(limit, 200))
    after = decode_cursor(cursor)
    query = select(Tenant, Connection).outerjoin(Connection, Connection.tenant_id == Tenant.id)
    query = _filtered(query, search=search, tenant_ids=tenant_ids, status=status)
    if after:
        query = query.where(Tenant.slug > after)
    rows = (await session.execute(query.order_by(Tenant.slug).limit(limit + 1))).all()
    page = [TenantRow(t, c) for t, c in rows[:limit]]
    return TenantPage(page, encode_cursor(page[-1].tenant.slug) if len(rows) > limit else None)


async def count_tenants(session: AsyncSession, *, search: str | None = None, status: str | None = None) -> int:
    query = select(func.count()).select_from(Tenant).outerjoin(Connection, Connection.tenant_id == Tenant.id)
    return int(await session.scalar(_filtered(query, search=search, tenant_ids=None, status=status)) or 0)


async def set_hipaa(
    session: AsyncSession, tenant: Tenant, *, hipaa: bool, actor: Actor, request_id: str | None = None
) -> Tenant:
    if tenant.hipaa == hipaa:
        return tenant
    tenant.hipaa = hipaa
    await audit_log.record(
        session, "tenant.hipaa", actor, tenant_id=tenant.id, target=tenant.slug, request_id=request_id,
        details={"hipaa": hipaa},
    )
    return tenant


async def rename(session: AsyncSession, tenant: Tenant, *, name: str, actor: Actor, request_id: str | None = None) -> Tenant:
    name = validate_name(name)
    if name != tenant.name:
        tenant.name = name
        await audit_log.record(session, "tenant.rename", actor, tenant_id=tenant.id, target=tenant.slug, request_id=request_id)
    return tenant


async def delete_tenant(session: AsyncSession, tenant: Tenant, *, actor: Actor, request_id: str | None = None) -> None:
    """Delete the tenant, its connection, links and users; its data key goes with it (shredded)."""
    await tenant_keys.shred(session, tenant.id)
    await audit_log.record(session, "tenant.delete", actor, tenant_id=tenant.id, target=tenant.slug, request_id=request_id)
    await session.delete(tenant)
    await session.flush()



def check_typed_confirmation(tenant: Tenant, typed: str) -> None:
    """A page's destructive action goes ahead only when the tenant's slug was typed in full."""
    if typed.strip().lower() != tenant.slug:
        raise ValidationFailed(
            f"Type the tenant's slug, {tenant.slug}, to confirm.",
            code="confirmation_mismatch",
            extra={"fields": [{"field": "confirm_slug", "problem": "mismatch"}]},
        )


async def tenants_holding_org(session: AsyncSession, org_id: str, *, besides: uuid.UUID) -> list[Tenant]:
    """Other tenants whose live (not disconnected) connection holds this Salesmsg org, by slug."""
    rows = await session.scalars(
        select(Tenant).join(Connection, Connection.tenant_id == Tenant.id)
        .where(Connection.salesmsg_org_id == org_id, Connection.tenant_id != besides, Connection.status != "disconnected")
        .order_by(Tenant.slug).limit(20)
    )
    return list(rows.all())
