"""Password reset links: issued by an operator (page or CLI), shown once, single use, short-lived.

The token is 256 random bits and only its SHA-256 is stored; issuing a new link revokes the
person's older ones. Opening the link spends nothing (mail scanners open links); setting the
password spends it with one conditional UPDATE (unused, not revoked, not expired), so of two
submissions exactly one wins and a link revoked while in use sets nothing. Using it
ends every session of the person. MFA stays on: a reset replaces the password, not the second
factor (an operator resets MFA separately, audited).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import audit_log
from app.audit.audit_log import Actor
from app.core.errors import Conflict, Gone, ValidationFailed
from app.core.models import PasswordReset, User
from app.identity import people
from app.kit.tokens import new_token, token_hash

TOKEN_PREFIX = "smc_pwr_"


async def issue(
    session: AsyncSession, *, user: User, minutes: int, actor: Actor, request_id: str | None = None
) -> tuple[PasswordReset, str]:
    """A new reset link for ``user`` (older unused ones are revoked); the token is returned once."""
    if user.disabled_at is not None:
        raise Conflict("This person is disabled: enable them before sending a reset link.", code="user_disabled")
    now = datetime.now(UTC)
    await session.execute(
        update(PasswordReset)
        .where(PasswordReset.user_id == user.id, PasswordReset.used_at.is_(None), PasswordReset.revoked_at.is_(None))
        .values(revoked_at=now)
        .execution_options(synchronize_session=False)
    )
    token = new_token(TOKEN_PREFIX)
    row = PasswordReset(
        token_hash=token_hash(token), user_id=user.id, created_by=actor.id or actor.type,
        created_at=now, expires_at=now + timedelta(minutes=minutes),
    )
    session.add(row)
    await session.flush()
    await audit_log.record(session, "password.reset_issued", actor, tenant_id=user.tenant_id, target=user.email,
                           request_id=request_id, details={"minutes": minutes})
    return row, token


def _invalid() -> Gone:
    return Gone("This password reset link is not valid. Ask an operator for a new one.", code="password_reset_invalid")


async def open_reset(session: AsyncSession, token: str) -> tuple[PasswordReset, User]:
    """The live reset for this token, or 410 with why it is not (used, expired, revoked or unknown)."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 100:
        raise _invalid()
    found = (
        await session.execute(
            select(PasswordReset, User).join(User, User.id == PasswordReset.user_id)
            .where(PasswordReset.token_hash == token_hash(token))
            .execution_options(populate_existing=True)  # read again in ``use``: what changed since
        )
    ).first()
    if found is None:
        raise _invalid()
    reset, user = found
    if reset.used_at is not None:
        raise Gone("This password reset link was used already. Ask an operator for a new one.", code="password_reset_used")
    if reset.revoked_at is not None or user.disabled_at is not None:
        raise _invalid()
    if reset.expires_at <= datetime.now(UTC):
        raise Gone("This password reset link has expired. Ask an operator for a new one.", code="password_reset_expired")
    return reset, user


async def _spend(session: AsyncSession, reset: PasswordReset) -> bool:
    """Mark the link used with one conditional UPDATE: only while it is unused, not revoked (a newer
    link revokes it) and not expired, so a link revoked after it was opened sets no password."""
    now = datetime.now(UTC)
    result = cast(
        CursorResult[Any],
        await session.execute(
            update(PasswordReset)
            .where(PasswordReset.id == reset.id, PasswordReset.used_at.is_(None), PasswordReset.revoked_at.is_(None),
                   PasswordReset.expires_at > now)
            .values(used_at=now)
            .execution_options(synchronize_session=False)
        ),
    )
    return result.rowcount == 1


async def use(
    session: AsyncSession, *, token: str, password: str, again: str, request_id: str | None = None
) -> User:
    """Set the new password and spend the link; every session of the person ends."""
    reset, user = await open_reset(session, token)
    if password != again:
        raise ValidationFailed("The two passwords differ.", code="passwords_differ")
    people.check_password_strength(password, email=user.email)
    if not await _spend(session, reset):
        await open_reset(session, token)  # why not: revoked, expired or used since it was opened
        raise Gone("This password reset link was used already. Ask an operator for a new one.", code="password_reset_used")
    await people.set_password(session, user, password)
    await audit_log.record(session, "password.reset_used", Actor("user", user.email), tenant_id=user.tenant_id,
                           target=user.email, request_id=request_id)
    return user
