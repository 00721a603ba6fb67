"""Invitations: an expiring, revocable link that lets a new org admin (of a tenant) or a new operator
choose a password.

Opening the link spends nothing (mail scanners open links before people do); accepting it does,
once (``kit.single_use``), and creates the user with the invitation's role and tenant, never with
anything from the form. The token is shown once and stored as its SHA-256.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import audit_log
from app.audit.audit_log import Actor
from app.core.errors import AppError, Conflict, Gone, NotFound
from app.core.models import Invitation, Tenant, User
from app.identity.people import check_password_strength, check_role, create_user, normalize_email
from app.kit.single_use import spend
from app.kit.tokens import new_token, token_hash

PREFIX = "smc_inv_"
OUTSTANDING, ACCEPTED, REVOKED, EXPIRED = "outstanding", "accepted", "revoked", "expired"
# The codes a refused invitation link answers with (the web layer shows them as a page of their own).
REFUSALS = ("invitation_invalid", "invitation_used", "invitation_revoked", "invitation_expired")
ASK = "Ask the person who invited you for a new invitation."


def _label(actor: Actor) -> str:
    return actor.id or actor.type


def _gone(code: str, message: str, title: str) -> AppError:
    error = Gone(f"{message} {ASK}", code=code)
    error.title = title
    return error


def refusal(invitation: Invitation, *, now: datetime | None = None) -> AppError | None:
    """Why the invitation no longer works, or None while it does."""
    now = now or datetime.now(UTC)
    if invitation.accepted_at is not None:
        error = Gone("This invitation was already used. Sign in with the account it created.", code="invitation_used")
        error.title = "Invitation already used"
        return error
    if invitation.revoked_at is not None:
        return _gone("invitation_revoked", "This invitation was revoked.", "Invitation revoked")
    if invitation.expires_at <= now:
        return _gone("invitation_expired", "This invitation has expired.", "Invitation expired")
    return None


def state_of(invitation: Invitation, *, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    if invitation.accepted_at is not None:
        return ACCEPTED
    if invitation.revoked_at is not None:
        return REVOKED
    if invitation.expires_at <= now:
        return EXPIRED
    return OUTSTANDING


async def _new(
    session: AsyncSession, *, role: str, tenant_id: uuid.UUID | None, email: str, hours: int, actor: Actor
) -> tuple[Invitation, str]:
    if await session.scalar(select(User.id).where(User.email == email)) is not None:
        raise Conflict("A user with this email exists.", code="user_exists")
    token = new_token(PREFIX)
    invitation = Invitation(
        id=uuid.uuid4(),
        token_hash=token_hash(token),
        tenant_id=tenant_id,
        role=role,
        email=email,
        created_by=_label(actor),
        expires_at=datetime.now(UTC) + timedelta(hours=hours),
    )
    session.add(invitation)
    await session.flush()
    return invitation, token


async def invite(
    session: AsyncSession,
    *,
    role: str,
    tenant: Tenant | None,
    email: str,
    hours: int,
    actor: Actor,
    request_id: str | None = None,
) -> tuple[Invitation, str]:
    """An invitation to become an operator (no tenant) or a tenant's org admin; the token is returned once."""
    check_role(role, tenant)
    email = normalize_email(email)
    invitation, token = await _new(session, role=role, tenant_id=tenant.id if tenant else None, email=email,
                                   hours=hours, actor=actor)
    await audit_log.record(session, "invitation.create", actor, tenant_id=invitation.tenant_id, target=email,
                           request_id=request_id, details={"role": role, "invitation": str(invitation.id)})
    return invitation, token


async def invite_org_admin(
    session: AsyncSession,
    *,
    tenant: Tenant,
    email: str,
    hours: int,
    actor: Actor,
    request_id: str | None = None,
) -> tuple[Invitation, str]:
    """An invitation to become the tenant's org admin (``invite`` with that role)."""
    return await invite(session, role="org_admin", tenant=tenant, email=email, hours=hours, actor=actor,
                        request_id=request_id)


async def outstanding(
    session: AsyncSession,
    *,
    tenant_id: uuid.UUID | None = None,
    role: str | None = None,
    include_closed: bool = False,
    limit: int = 200,
) -> list[Invitation]:
    """Invitations not yet accepted, revoked or expired (all of them with ``include_closed``), newest first."""
    query = select(Invitation)
    if tenant_id is not None:
        query = query.where(Invitation.tenant_id == tenant_id)
    if role is not None:
        query = query.where(Invitation.role == role)
    if not include_closed:
        query = query.where(Invitation.accepted_at.is_(None), Invitation.revoked_at.is_(None),
                            Invitation.expires_at > datetime.now(UTC))
    rows = await session.scalars(query.order_by(Invitation.created_at.desc(), Invitation.id).limit(limit))
    return list(rows)


async def get_invitation(session: AsyncSession, invitation_id: uuid.UUID) -> Invitation:
    invitation = await session.get(Invitation, invitation_id, populate_existing=True)
    if invitation is None:
        raise NotFound("No such invitation.", code="invitation_not_found")
    return invitation


async def _close(session: AsyncSession, invitation: Invitation, *, actor: Actor) -> bool:
    """Revoke it unless it was accepted first; True if we did."""
    result = cast(CursorResult[Any], await session.execute(
        update(Invitation)
        .where(Invitation.id == invitation.id, Invitation.accepted_at.is_(None), Invitation.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC), revoked_by=_label(actor))
        .execution_options(synchronize_session=False)
    ))
    await session.refresh(invitation)
    return result.rowcount == 1


def _already_accepted() -> AppError:
    return Conflict("This invitation was already accepted; there is nothing to revoke.", code="invitation_used")


async def revoke(
    session: AsyncSession, *, invitation_id: uuid.UUID, actor: Actor, request_id: str | None = None
) -> Invitation:
    """Revoke an invitation not accepted yet; its link stops working at once. Revoking twice is a no-op."""
    invitation = await get_invitation(session, invitation_id)
    closed = (await _close(session, invitation, actor=actor)
              if invitation.accepted_at is None and invitation.revoked_at is None else False)
    if invitation.accepted_at is not None:
        raise _already_accepted()
    if closed:
        await audit_log.record(session, "invitation.revoke", actor, tenant_id=invitation.tenant_id, target=invitation.email,
                               request_id=request_id, details={"role": invitation.role, "invitation": str(invitation.id)})
    return invitation


async def reissue(
    session: AsyncSession, *, invitation_id: uuid.UUID, hours: int, actor: Actor, request_id: str | None = None
) -> tuple[Invitation, str]:
    """Revoke the invitation (if still open) and send a new one to the same person, same role and tenant."""
    old = await get_invitation(session, invitation_id)
    if old.accepted_at is not None:
        raise Conflict("This invitation was already accepted; the account exists.", code="invitation_used")
    revoked = await _close(session, old, actor=actor) if old.revoked_at is None else False
    if old.accepted_at is not None:  # accepted while we were here
        raise Conflict("This invitation was already accepted; the account exists.", code="invitation_used")
    invitation, token = await _new(session, role=old.role, tenant_id=old.tenant_id, email=old.email, hours=hours,
                                   actor=actor)
    await audit_log.record(session, "invitation.reissue", actor, tenant_id=old.tenant_id, target=old.email,
                           request_id=request_id, details={"role": old.role, "invitation": str(invitation.id),
                                                           "replaces": str(old.id), "revoked": revoked})
    return invitation, token


async def find(session: AsyncSession, token: str) -> Invitation:
    if not token.startswith(PREFIX) or len(token) > 200:
        raise NotFound("This invitation link is not valid.", code="invitation_invalid")
    invitation = await session.scalar(select(Invitation).where(Invitation.token_hash == token_hash(token)))
    if invitation is None:
        raise NotFound("This invitation link is not valid.", code="invitation_invalid")
    return invitation


async def open_invitation(session: AsyncSession, token: str) -> Invitation:
    """The invitation behind a link, if it still works; spends nothing."""
    invitation = await find(session, token)
    refused = refusal(invitation)
    if refused is not None:
        raise refused
    return invitation


async def accept_invitation(
    session: AsyncSession, *, token: str, password: str, name: str, request_id: str | None = None
) -> User:
    """Spend the invitation once and create its user, with the invitation's role and tenant."""
    invitation = await open_invitation(session, token)
    check_password_strength(password, email=invitation.email)
    # Lock the row so a revoke in flight is seen (PostgreSQL); then spend it once.
    locked = await session.scalar(
        select(Invitation).where(Invitation.id == invitation.id).with_for_update().execution_options(populate_existing=True)
    )
    refused = refusal(locked) if locked is not None else None
    if refused is not None:
        raise refused
    if not await spend(session, Invitation.accepted_at, invitation.id):
        raise refusal(invitation) or Gone("This invitation was already used.", code="invitation_used")
    tenant = await session.get(Tenant, invitation.tenant_id) if invitation.tenant_id is not None else None
    if invitation.role == "org_admin" and tenant is None:  # the tenant was deleted: cascades, so only a race
        raise NotFound("This invitation link is not valid.", code="invitation_invalid")
    return await create_user(
        session,
        email=invitation.email,
        password=password,
        role=invitation.role,
        tenant=tenant if invitation.role == "org_admin" else None,
        name=name,
        actor=Actor("invitation", invitation.email),
        request_id=request_id,
    )
