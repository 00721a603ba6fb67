"""Connect links: a single-use, expiring link an operator sends to a tenant's admin.

Opening the link spends it once and turns it into a browser session bound to that tenant (the
web layer does that part). The link is stored only as its SHA-256.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import audit_log
from app.audit.audit_log import ACTOR_LINK, Actor
from app.core.errors import BadRequest, Gone
from app.core.models import ConnectLink, Tenant
from app.kit.single_use import spend
from app.kit.tokens import new_token, token_hash
from app.tenants.registry import get_tenant

PREFIX = "smc_link_"


async def create_connect_link(
    session: AsyncSession, *, tenant: Tenant, hours: int, actor: Actor, request_id: str | None = None
) -> tuple[ConnectLink, str]:
    """A single-use, expiring link for the tenant's admin; the token is returned once."""
    token = new_token(PREFIX)
    link = ConnectLink(
        token_hash=token_hash(token),
        tenant_id=tenant.id,
        created_by=actor.id or actor.type,
        expires_at=datetime.now(UTC) + timedelta(hours=hours),
    )
    session.add(link)
    await session.flush()
    await audit_log.record(session, "connect_link.create", actor, tenant_id=tenant.id, target=tenant.slug,
                           request_id=request_id, details={"expires_at": link.expires_at.isoformat()})
    return link, token


async def redeem_connect_link(session: AsyncSession, token: str, *, request_id: str | None = None) -> Tenant:
    """Spend the link (once) and return its tenant."""
    invalid = BadRequest("This connect link is not valid.", code="connect_link_invalid")
    if not token.startswith(PREFIX) or len(token) > 200:
        raise invalid
    link = await session.scalar(select(ConnectLink).where(ConnectLink.token_hash == token_hash(token)))
    if link is None:
        raise invalid
    used = Gone("This connect link was already used. Ask for a new one.", code="connect_link_used")
    if link.used_at is not None:
        raise used
    if link.expires_at <= datetime.now(UTC):
        raise Gone("This connect link has expired. Ask for a new one.", code="connect_link_expired")
    if not await spend(session, ConnectLink.used_at, link.id):
        raise used
    tenant = await get_tenant(session, link.tenant_id)
    await audit_log.record(session, "connect_link.redeem", Actor(ACTOR_LINK, str(link.id)), tenant_id=tenant.id,
                           target=tenant.slug, request_id=request_id)
    return tenant
