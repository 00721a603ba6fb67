"""People: operators and org admins, argon2 passwords, rate-limited sign-in."""

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
    RateLimited,
    Unauthorized,
    ValidationFailed,
)
from app.core.models import LoginAttempt, Tenant, User

ROLES = ("operator", "org_admin")
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
    if role not in ROLES:
        raise ValidationFailed("The role is operator or org_admin.", code="invalid_role")
    if role == "org_admin" and tenant is None:
        raise ValidationFailed("An org admin belongs to a tenant.", code="tenant_required")
    if role == "operator" and tenant is not None:
        raise ValidationFailed("An operator belongs to no tenant.", code="invalid_role")
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


async def authenticate(
    session: AsyncSession, *, email: str, password: str, ip: str, limit_per_15_minutes: int
) -> User:
    """The user for these credentials; every attempt is recorded and limited by email and by IP."""
    email = email.strip().lower()[:320]
    since = datetime.now(UTC) - timedelta(minutes=15)
    failures = await session.scalar(
        select(func.count())
        .select_from(LoginAttempt)
        .where(LoginAttempt.at >= since, LoginAttempt.succeeded.is_(False))
        .where(or_(LoginAttempt.email == email, LoginAttempt.ip == ip))
    )
    if (failures or 0) >= limit_per_15_minutes:
        raise RateLimited(
            "Too many sign-in attempts. Wait 15 minutes and try again.",
            code="too_many_attempts",
            headers={"Retry-After": "900"},
        )
    user = await session.scalar(select(User).where(User.email == email))
    ok = await _verify(user.password_hash if user and user.password_hash else _DUMMY_HASH, password)
    ok = ok and user is not None and user.disabled_at is None
    session.add(LoginAttempt(email=email, ip=ip[:64], succeeded=ok))
    # Committed now: a failed attempt must count even though the request ends in an error.
    await session.commit()
    if not ok or user is None:
        raise Unauthorized("The email or password is not right.", code="invalid_credentials")
    user.last_login_at = datetime.now(UTC)
    if _hasher.check_needs_rehash(user.password_hash or ""):
        user.password_hash = await hash_password(password)
    return user


async def forget_old_attempts(session: AsyncSession, *, older_than: timedelta = timedelta(days=2)) -> None:
    """Sign-in attempts count for 15 minutes; the worker drops them after ``older_than``."""
    await session.execute(delete(LoginAttempt).where(LoginAttempt.at < datetime.now(UTC) - older_than))
