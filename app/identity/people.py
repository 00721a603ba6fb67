"""People: operators and org admins, argon2 passwords, rate-limited sign-in, disabling.

Sign-in attempts (``login_attempts``) are counted per kind: ``password`` for the password step
and a password change, ``totp`` for the second factor (``app.identity.mfa``); each kind has its
own limit over 15 minutes, by email and by IP. Each attempt is committed as failed before it is
checked (``begin_attempt``) and marked right afterwards, so it counts even though the request ends
in an error, and requests sent in parallel cannot all be checked before any failure is counted.

A person is disabled, never deleted (the audit log names them): their sessions end at once and
the password step refuses them. Nobody disables themselves, and the last enabled operator cannot
be disabled (the operators' rows are locked while that is checked, so two operators disabling
each other at once cannot both succeed).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import uuid
from datetime import UTC, datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import audit_log
from app.audit.audit_log import Actor
from app.core.errors import (
    Conflict,
    Forbidden,
    NotFound,
    RateLimited,
    Unauthorized,
    ValidationFailed,
)
from app.core.models import LoginAttempt, Tenant, User
from app.identity import sessions

ROLES = ("operator", "org_admin")


def check_role(role: str, tenant: Tenant | None) -> None:
    """An operator belongs to no tenant, an org admin to one."""
    if role not in ROLES:
        raise ValidationFailed("The role is operator or org_admin.", code="invalid_role")
    if role == "org_admin" and tenant is None:
        raise ValidationFailed("An org admin belongs to a tenant.", code="tenant_required")
    if role == "operator" and tenant is not None:
        raise ValidationFailed("An operator belongs to no tenant.", code="invalid_role")


MIN_PASSWORD = 12
EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s]{2,63}")

_hasher = PasswordHasher()  # argon2id with the library's (RFC 9106) defaults
# Verified when the email is unknown, so a miss costs what a hit costs.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def normalize_email(email: str) -> str:
    email = email.strip().lower()
    if not EMAIL.fullmatch(email) or len(email) > 320:
        raise ValidationFailed("Enter a valid email address.", code="invalid_email", extra={"fields": [{"field": "email", "problem": "invalid"}]})
    return email


def check_password_strength(password: str, *, email: str = "") -> None:
    if len(password) < MIN_PASSWORD or len(password) > 1024:
        raise ValidationFailed(
            f"A password is {MIN_PASSWORD} to 1024 characters.",
            code="weak_password",
            extra={"fields": [{"field": "password", "problem": f"at least {MIN_PASSWORD} characters"}]},
        )
    if email and email.split("@")[0] in password.lower():
        raise ValidationFailed("The password must not contain your email name.", code="weak_password")


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(_hasher.hash, password)


async def _verify(password_hash: str, password: str) -> bool:
    def check() -> bool:
        try:
            return _hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    return await asyncio.to_thread(check)


async def create_user(
    session: AsyncSession,
    *,
    email: str,
    password: str,
    role: str,
    tenant: Tenant | None = None,
    name: str = "",
    actor: Actor,
    request_id: str | None = None,
) -> User:
    check_role(role, tenant)
    email = normalize_email(email)
    check_password_strength(password, email=email)
    if await session.scalar(select(User.id).where(User.email == email)) is not None:
        raise Conflict("A user with this email exists.", code="user_exists")
    user = User(
        id=uuid.uuid4(),
        email=email,
        name=" ".join(name.split())[:200],
        password_hash=await hash_password(password),
        role=role,
        tenant_id=tenant.id if tenant else None,
    )
    session.add(user)
    try:
        await session.flush()
    except IntegrityError as exc:
        raise Conflict("A user with this email exists.", code="user_exists") from exc
    await audit_log.record(
        session, "user.create", actor, tenant_id=user.tenant_id, target=email, request_id=request_id,
        details={"role": role},
    )
    return user


async def begin_attempt(session: AsyncSession, *, email: str, ip: str, kind: str, limit_per_15_minutes: int) -> LoginAttempt:
    """Record this attempt as failed and commit it, then refuse (429 ``too_many_attempts``) when the
    failures by this email or IP in 15 minutes, this one included, are over ``limit``.

    Recording before counting is what makes the limit hold for requests sent all at once: each
    one's count includes every attempt committed before it, so at most ``limit`` of them go on to
    be checked. A refused attempt is removed again (it was never checked). The caller marks a
    right one with ``attempt_succeeded``.
    """
    attempt = LoginAttempt(email=email[:320], ip=ip[:64], kind=kind, succeeded=False)
    session.add(attempt)
    await session.commit()
    since = datetime.now(UTC) - timedelta(minutes=15)
    failures = await session.scalar(
        select(func.count())
        .select_from(LoginAttempt)
        .where(LoginAttempt.at >= since, LoginAttempt.succeeded.is_(False), LoginAttempt.kind == kind)
        .where(or_(LoginAttempt.email == email[:320], LoginAttempt.ip == ip[:64]))
    )
    if (failures or 0) > limit_per_15_minutes:
        await session.delete(attempt)
        await session.commit()
        raise RateLimited(
            "Too many attempts. Wait 15 minutes and try again.",
            code="too_many_attempts",
            headers={"Retry-After": "900"},
        )
    return attempt


def attempt_succeeded(attempt: LoginAttempt) -> None:
    attempt.succeeded = True


async def authenticate(
    session: AsyncSession, *, email: str, password: str, ip: str, limit_per_15_minutes: int
) -> User:
    """The user for these credentials; every attempt is recorded and limited by email and by IP.

    This is the password step only: the caller signs the person in (``record_sign_in``) or, when
    they have MFA, asks for the second factor first.
    """
    email = email.strip().lower()[:320]
    attempt = await begin_attempt(session, email=email, ip=ip, kind="password", limit_per_15_minutes=limit_per_15_minutes)
    user = await session.scalar(select(User).where(User.email == email))
    ok = await _verify(user.password_hash if user and user.password_hash else _DUMMY_HASH, password)
    ok = ok and user is not None and user.disabled_at is None
    if not ok or user is None:
        raise Unauthorized("The email or password is not right.", code="invalid_credentials")
    attempt_succeeded(attempt)
    await session.commit()
    if _hasher.check_needs_rehash(user.password_hash or ""):
        user.password_hash = await hash_password(password)
    return user


def record_sign_in(user: User) -> None:
    """The person is signed in now (after the second factor, when they have one)."""
    user.last_login_at = datetime.now(UTC)


async def set_password(session: AsyncSession, user: User, password: str) -> None:
    """A new password (already checked for strength); every session of the person ends."""
    user.password_hash = await hash_password(password)
    user.password_changed_at = datetime.now(UTC)
    await sessions.end_all_for_user(session, user.id)


async def change_password(
    session: AsyncSession,
    *,
    user: User,
    current: str,
    new: str,
    again: str,
    ip: str,
    keep_session: str | None,
    limit_per_15_minutes: int,
    request_id: str | None = None,
) -> None:
    """The person changes their own password: the current one is checked (counted like a sign-in,
    so a borrowed session cannot guess it), the new one must be strong; their other sessions end."""
    attempt = await begin_attempt(session, email=user.email, ip=ip, kind="password",
                                  limit_per_15_minutes=limit_per_15_minutes)
    if not await _verify(user.password_hash or _DUMMY_HASH, current):
        raise ValidationFailed("The current password is not right.", code="wrong_password",
                               extra={"fields": [{"field": "current", "problem": "not right"}]})
    attempt_succeeded(attempt)
    if new != again:
        raise ValidationFailed("The two new passwords differ.", code="passwords_differ",
                               extra={"fields": [{"field": "again", "problem": "differs"}]})
    check_password_strength(new, email=user.email)
    user.password_hash = await hash_password(new)
    user.password_changed_at = datetime.now(UTC)
    await sessions.end_all_for_user(session, user.id, keep=keep_session)
    await audit_log.record(session, "password.change", Actor("user", user.email), tenant_id=user.tenant_id,
                           target=user.email, request_id=request_id)


async def get_user(session: AsyncSession, user_id: uuid.UUID) -> User:
    user = await session.get(User, user_id)
    if user is None:
        raise NotFound("No such person.", code="user_not_found")
    return user


async def find_user(session: AsyncSession, email: str) -> User:
    user = await session.scalar(select(User).where(User.email == email.strip().lower()[:320]))
    if user is None:
        raise NotFound("No person has this email.", code="user_not_found")
    return user


async def list_people(session: AsyncSession, *, role: str | None = None) -> list[tuple[User, Tenant | None]]:
    """Operators and org admins with their tenant, operators first, then by email."""
    query = select(User, Tenant).outerjoin(Tenant, Tenant.id == User.tenant_id).order_by(User.role.desc(), User.email)
    if role in ROLES:
        query = query.where(User.role == role)
    return [(user, tenant) for user, tenant in (await session.execute(query)).all()]


async def disable_user(
    session: AsyncSession, *, user: User, actor: Actor, acting_user_id: uuid.UUID | None, request_id: str | None = None
) -> None:
    """Disable a person: refused for oneself and for the last enabled operator; their sessions end now."""
    if acting_user_id is not None and user.id == acting_user_id:
        raise Forbidden("You cannot disable yourself.", code="cannot_disable_self")
    if user.disabled_at is not None:
        return
    if user.role == "operator":
        # Lock the enabled operators (PostgreSQL; SQLite serialises writers anyway) before counting.
        enabled = (
            await session.scalars(
                select(User.id).where(User.role == "operator", User.disabled_at.is_(None)).with_for_update()
            )
        ).all()
        if len([uid for uid in enabled if uid != user.id]) == 0:
            raise Conflict("The last enabled operator cannot be disabled.", code="last_operator")
    user.disabled_at = datetime.now(UTC)
    user.disabled_by = actor.id or actor.type
    await sessions.end_all_for_user(session, user.id)
    await audit_log.record(session, "user.disable", actor, tenant_id=user.tenant_id, target=user.email,
                           request_id=request_id)


async def enable_user(session: AsyncSession, *, user: User, actor: Actor, request_id: str | None = None) -> None:
    if user.disabled_at is None:
        return
    user.disabled_at = None
    user.disabled_by = None
    await audit_log.record(session, "user.enable", actor, tenant_id=user.tenant_id, target=user.email,
                           request_id=request_id)


async def forget_old_attempts(session: AsyncSession, *, older_than: timedelta = timedelta(days=2)) -> None:
    """Sign-in attempts count for 15 minutes; the worker drops them after ``older_than``."""
    await session.execute(delete(LoginAttempt).where(LoginAttempt.at < datetime.now(UTC) - older_than))
