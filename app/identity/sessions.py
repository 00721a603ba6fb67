"""Server-side browser sessions and CSRF tokens.

The cookie holds 256 random bits; the database keeps only their SHA-256. A new id is issued at
every sign-in (no fixation), sessions end after an idle timeout and an absolute lifetime, and
the cookie is HttpOnly, SameSite=Lax, and Secure with the ``__Host-`` prefix under https.

Signed-in and connect-link sessions carry a synchronizer CSRF token; forms shown before
sign-in use a double-submit cookie signed with ``SMC_SESSION_SECRET``.

A person with MFA first gets a session at stage ``mfa``: the password was right, the second factor
is still due. It signs nobody in (the viewer treats it as anonymous), lives at most
``MFA_STAGE_MINUTES``, and is replaced by a new full session (a new id) once the code is right.
Disabling a person, a password change or reset, turning MFA on or off, new recovery codes and an
MFA reset delete their sessions at once (``end_all_for_user``; the browser that made its own
change gets a new session id), and ``load`` refuses a disabled person's session on the next request anyway.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from datetime import UTC, datetime, timedelta

from fastapi import Response
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.models import User, WebSession
from app.core.settings import Settings
from app.kit.tokens import token_hash

_TOUCH_EVERY = timedelta(seconds=60)
STAGE_FULL, STAGE_MFA = "full", "mfa"
MFA_STAGE_MINUTES = 10


def session_cookie_name(settings: Settings) -> str:
    return "__Host-smc_session" if settings.https else "smc_session"


def csrf_cookie_name(settings: Settings) -> str:
    return "__Host-smc_csrf" if settings.https else "smc_csrf"


async def start(
    session: AsyncSession,
    settings: Settings,
    *,
    user: User | None = None,
    link_tenant_id: uuid.UUID | None = None,
    link_id: uuid.UUID | None = None,
    replaces: str | None = None,
    stage: str = STAGE_FULL,
) -> tuple[str, WebSession]:
    """A new session (new id); the one it replaces, if any, is deleted."""
    if stage not in (STAGE_FULL, STAGE_MFA):
        raise ValueError(f"unknown session stage {stage!r}")
    if replaces:
        await session.execute(delete(WebSession).where(WebSession.id == token_hash(replaces)))
    token = secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    row = WebSession(
        id=token_hash(token),
        user_id=user.id if user else None,
        link_tenant_id=link_tenant_id,
        link_id=link_id,
        stage=stage,
        csrf_token=secrets.token_urlsafe(32),
        created_at=now,
        last_seen_at=now,
        expires_at=now + (
            timedelta(minutes=MFA_STAGE_MINUTES) if stage == STAGE_MFA else timedelta(hours=settings.session_absolute_hours)
        ),
    )
    session.add(row)
    await session.flush()
    return token, row


async def load(session: AsyncSession, settings: Settings, token: str | None) -> tuple[WebSession, User | None] | None:
    """The live session for a cookie value, or None (missing, idle too long, or too old)."""
    if not token or len(token) > 100:
        return None
    found = (
        await session.execute(
            select(WebSession, User).outerjoin(User, User.id == WebSession.user_id).where(WebSession.id == token_hash(token))
        )
    ).first()
    if found is None:
        return None
    row, user = found
    now = datetime.now(UTC)
    idle_deadline = row.last_seen_at + timedelta(minutes=settings.session_idle_minutes)
    if row.expires_at <= now or idle_deadline <= now or (user is not None and user.disabled_at is not None):
        await session.delete(row)
        return None
    if row.user_id is not None and user is None:  # the user was deleted
        await session.delete(row)
        return None
    if now - row.last_seen_at >= _TOUCH_EVERY:
        row.last_seen_at = now
    return row, user


async def end(session: AsyncSession, token: str | None) -> None:
    if token:
        await session.execute(delete(WebSession).where(WebSession.id == token_hash(token)))


async def end_all_for_user(session: AsyncSession, user_id: uuid.UUID, *, keep: str | None = None) -> None:
    """Every session of this person ends now (all but ``keep``, the cookie of the session making the change)."""
    statement = delete(WebSession).where(WebSession.user_id == user_id)
    if keep:
        statement = statement.where(WebSession.id != token_hash(keep))
    await session.execute(statement)


async def purge_expired(session: AsyncSession) -> None:
    """Sessions past their absolute lifetime (``load`` already refuses them); the worker drops them."""
    await session.execute(delete(WebSession).where(WebSession.expires_at <= datetime.now(UTC)))


def set_session_cookie(response: Response, settings: Settings, token: str) -> None:
    response.set_cookie(
        session_cookie_name(settings),
        token,
        max_age=settings.session_absolute_hours * 3600,
        path="/",
        secure=settings.https,
        httponly=True,
        samesite="lax",
    )


def clear_session_cookie(response: Response, settings: Settings) -> None:
    response.delete_cookie(session_cookie_name(settings), path="/", secure=settings.https, httponly=True, samesite="lax")


# CSRF for forms shown before sign-in ----------------------------------------------------


def _mac(secret: str, nonce: str) -> str:
    return hmac.new(secret.encode(), b"smc-csrf|" + nonce.encode(), hashlib.sha256).hexdigest()[:32]


def new_anonymous_csrf(settings: Settings) -> str:
    nonce = secrets.token_urlsafe(24)
    return f"{nonce}.{_mac(settings.session_secret, nonce)}"


def _same(a: str, b: str) -> bool:
    """Constant-time equality of two tokens; a token that is not ASCII is never ours (and
    ``hmac.compare_digest`` refuses to compare such a str)."""
    return a.isascii() and b.isascii() and hmac.compare_digest(a.encode(), b.encode())


def anonymous_csrf_valid(settings: Settings, cookie: str | None, submitted: str | None) -> bool:
    if not cookie or not submitted or len(cookie) > 200:
        return False
    if not _same(cookie, submitted):
        return False
    nonce, _, mac = cookie.partition(".")
    return bool(nonce) and _same(mac, _mac(settings.session_secret, nonce))


def set_csrf_cookie(response: Response, settings: Settings, value: str) -> None:
    response.set_cookie(
        csrf_cookie_name(settings), value, path="/", secure=settings.https, httponly=True, samesite="lax", max_age=3600 * 12
    )


def session_csrf_valid(row: WebSession, submitted: str | None) -> bool:
    return bool(submitted) and _same(row.csrf_token, submitted or "")
