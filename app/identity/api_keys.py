"""API keys for internal services: ``smc_live_<prefix>_<secret>``, shown once, stored as SHA-256.

The prefix is a lookup index (unique, not secret); the whole key is compared by its SHA-256 in
constant time. Keys are limited to listed tenants or all, read-only or read-write; an operator
key may also manage tenants, HIPAA flags and BAAs. Revocation takes effect on the next request.
"""

from __future__ import annotations

import re
import secrets
import uuid
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import audit_log
from app.audit.audit_log import Actor
from app.core.errors import Conflict, NotFound, ValidationFailed
from app.core.models import ApiKey, ApiKeyTenant, Tenant
from app.kit.tokens import token_hash
from app.tenants.registry import get_tenant

KEY_FORMAT = re.compile(r"smc_live_([A-Za-z0-9]{12})_([A-Za-z0-9_-]{43})")
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def parse(presented: str) -> str | None:
    """The lookup prefix of a well-formed key, else None."""
    found = KEY_FORMAT.fullmatch(presented)
    return found.group(1) if found else None


def new_key() -> tuple[str, str]:
    prefix = "".join(secrets.choice(_ALPHABET) for _ in range(12))
    return prefix, f"smc_live_{prefix}_{secrets.token_urlsafe(32)}"


async def create_api_key(
    session: AsyncSession,
    *,
    name: str,
    tenant_refs: list[str] | None,
    read_only: bool = False,
    operator: bool = False,
    actor: Actor,
    request_id: str | None = None,
) -> tuple[ApiKey, str]:
    """A new key; ``tenant_refs`` None means every tenant. Returns the row and the key (once)."""
    name = " ".join(name.split())
    if not 1 <= len(name) <= 200:
        raise ValidationFailed("A key needs a name of 1-200 characters.", code="invalid_name")
    if operator and tenant_refs:
        raise ValidationFailed("An operator key covers every tenant; do not list tenants.", code="invalid_key_scope")
    if operator and read_only:
        raise ValidationFailed("An operator key cannot be read-only.", code="invalid_key_scope")
    tenants: list[Tenant] = []
    for ref in tenant_refs or []:
        tenants.append(await get_tenant(session, ref))
    if tenant_refs is not None and not tenants:
        raise ValidationFailed("List at least one tenant, or none for all tenants.", code="invalid_key_scope")
    prefix, key = new_key()
    while await session.scalar(select(ApiKey.id).where(ApiKey.prefix == prefix)) is not None:
        prefix, key = new_key()
    row = ApiKey(
        id=uuid.uuid4(),
        prefix=prefix,
        key_hash=token_hash(key),
        name=name,
        all_tenants=tenant_refs is None,
        read_only=read_only,
        operator=operator,
        created_by=actor.id or actor.type,
    )
    session.add(row)
    await session.flush()
    for tenant in {t.id: t for t in tenants}.values():
        session.add(ApiKeyTenant(api_key_id=row.id, tenant_id=tenant.id))
    await session.flush()
    await audit_log.record(
        session, "api_key.create", actor, target=f"{name} ({prefix})", request_id=request_id,
        tenant_id=tenants[0].id if len(tenants) == 1 else None,
        details={"tenants": sorted(t.slug for t in tenants) if tenant_refs is not None else "all",
                 "read_only": read_only, "operator": operator},
    )
    return row, key


async def revoke_api_key(session: AsyncSession, *, key_id: uuid.UUID, actor: Actor, request_id: str | None = None) -> ApiKey:
    row = await session.get(ApiKey, key_id)
    if row is None:
        raise NotFound("No such API key.", code="api_key_not_found")
    if row.revoked_at is not None:
        raise Conflict("The key is already revoked.", code="api_key_revoked")
    row.revoked_at = datetime.now(UTC)
    await audit_log.record(session, "api_key.revoke", actor, target=f"{row.name} ({row.prefix})", request_id=request_id)
    return row


async def find_by_prefix(session: AsyncSession, prefix: str) -> ApiKey | None:
    return await session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))


async def covered_tenant_ids(session: AsyncSession, key: ApiKey) -> set[uuid.UUID] | None:
    """The tenants a key covers; None means all."""
    if key.all_tenants:
        return None
    return set((await session.scalars(select(ApiKeyTenant.tenant_id).where(ApiKeyTenant.api_key_id == key.id))).all())


async def keys_for_tenant(session: AsyncSession, tenant_id: uuid.UUID) -> list[ApiKey]:
    """Keys that name this tenant (all-tenant keys are listed separately)."""
    query = select(ApiKey).join(ApiKeyTenant, ApiKeyTenant.api_key_id == ApiKey.id).where(ApiKeyTenant.tenant_id == tenant_id)
    return list((await session.scalars(query.order_by(ApiKey.created_at.desc()))).all())


async def list_keys(session: AsyncSession) -> list[ApiKey]:
    return list((await session.scalars(select(ApiKey).order_by(ApiKey.created_at.desc()))).all())
