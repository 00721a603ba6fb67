"""Invitations: a single-use, expiring link that lets a new org admin choose a password."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import audit_log
from app.audit.audit_log import Actor
from app.core.errors import Conflict, Gone, NotFound
from app.core.models import Invitation, Tenant, User
from app.identity.people import check_password_strength, create_user, normalize_email
from app.kit.single_use import spend
from app.kit.tokens import new_token, token_hash


async def invite_org_admin(
    session: AsyncSession,
    *,
    tenant: Tenant,
    email: str,
    hours: int,
    actor: Actor,
    request_id: str | None = None,
) -> tuple[Invitation, str]:
    """An invitation to become the tenant's org admin; the token is returned once."""
    email = normalize_email(email)
    if await session.scalar(select(User.id).where(User.email == email)) is not None:
        raise Conflict("A user with this email exists.", code="user_exists")
    token = new_token("smc_inv_")
    invitation = Invitation(
        token_hash=token_hash(token),
        tenant_id=tenant.id,
        email=email,
        created_by=actor.id or actor.type,
        expires_at=datetime.now(UTC) + timedelta(hours=hours),
    )
    session.add(invitation)
    await session.flush()
    await audit_log.record(session, "invitation.create", actor, tenant_id=tenant.id, target=email, request_id=request_id)
    return invitation, token


async def open_invitation(session: AsyncSession, token: str) -> Invitation:
    invitation = await session.scalar(select(Invitation).where(Invitation.token_hash == token_hash(token)))
    if invitation is None:
        raise NotFound("This invitation link is not valid.", code="invitation_invalid")
    if invitation.accepted_at is not None:
        raise Gone("This invitation was already used.", code="invitation_used")
    if invitation.expires_at <= datetime.now(UTC):
        raise Gone("This invitation has expired; ask for a new one.", code="invitation_expired")
    return invitation


async def accept_invitation(
    session: AsyncSession, *, token: str, password: str, name: str, request_id: str | None = None
) -> User:
    invitation = await open_invitation(session, token)
    check_password_strength(password, email=invitation.email)
    if not await spend(session, Invitation.accepted_at, invitation.id):
        raise Gone("This invitation was already used.", code="invitation_used")
    tenant = await session.get(Tenant, invitation.tenant_id)
    return await create_user(
        session,
        email=invitation.email,
        password=password,
        role="org_admin",
        tenant=tenant,
        name=name,
        actor=Actor("invitation", invitation.email),
        request_id=request_id,
    )
