"""Connect links: an expiring, revocable link an operator sends to a tenant's admin.

Opening a link spends nothing: mail security scanners and chat link previews open links before
people do, so an open only records itself (``first_opened_at``, ``open_count``) and the web layer
starts a browser session bound to the tenant and to the link. The link is spent (``used_at``, once,
with ``kit.single_use``) in the transaction that makes a connection through one of its sessions.
A revoked, expired or spent link stops working for every session it started, not only for new
openers: a session stays tied to its link for its whole life, and once the link is spent it may see
only the "connected" page. A link session that names no link has no rights at all. The link is
stored only as its SHA-256; the token is shown once.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import audit_log
from app.audit.audit_log import ACTOR_LINK, Actor
from app.core.errors import AppError, Conflict, Gone, NotFound
from app.core.models import ConnectLink, Tenant, WebSession
from app.kit.single_use import spend
from app.kit.tokens import new_token, token_hash
from app.tenants.registry import get_tenant

PREFIX = "smc_link_"

OUTSTANDING, OPENED, USED, REVOKED, EXPIRED = "outstanding", "opened", "used", "revoked", "expired"
ASK = "Ask the person who sent it for a new link."
# The codes a refused link answers with (the web layer shows them as a page of their own).
REFUSALS = ("connect_link_invalid", "connect_link_revoked", "connect_link_expired", "connect_link_used")


def _invalid() -> AppError:
    error = NotFound(f"This connect link is not valid. Check that the whole link was copied, or {ASK[0].lower()}{ASK[1:]}",
                     code="connect_link_invalid")
    error.title = "Link not valid"
    return error


def _gone(code: str, message: str, title: str) -> AppError:
    error = Gone(f"{message} {ASK}", code=code, hint="Each link works until a connection is made through it, "
                 "it expires, or the operator revokes it.")
    error.title = title
    return error


def _used() -> AppError:
    return _gone("connect_link_used", "This connect link was already used to connect the organization.",
                 "Link already used")


def refusal(link: ConnectLink, *, now: datetime | None = None) -> AppError | None:
    """Why the link no longer works, or None while it does."""
    now = now or datetime.now(UTC)
    if link.revoked_at is not None:
        return _gone("connect_link_revoked", "This connect link was revoked.", "Link revoked")
    if link.used_at is not None:
        return _used()
    if link.expires_at <= now:
        return _gone("connect_link_expired", "This connect link has expired.", "Link expired")
    return None


def state_of(link: ConnectLink, *, now: datetime | None = None) -> str:
    """One word for the list: used, revoked, expired, opened (not used yet) or outstanding."""
    now = now or datetime.now(UTC)
    if link.used_at is not None:
        return USED
    if link.revoked_at is not None:
        return REVOKED
    if link.expires_at <= now:
        return EXPIRED
    return OPENED if link.open_count else OUTSTANDING


def is_open(link: ConnectLink, *, now: datetime | None = None) -> bool:
    """Still usable: revoking it means something."""
    return state_of(link, now=now) in (OUTSTANDING, OPENED)


def _label(actor: Actor) -> str:
    return actor.id or actor.type


def _new_link(tenant: Tenant, *, hours: int, actor: Actor) -> tuple[ConnectLink, str]:
    token = new_token(PREFIX)
    link = ConnectLink(
        id=uuid.uuid4(),
        token_hash=token_hash(token),
        tenant_id=tenant.id,
        created_by=_label(actor),
        expires_at=datetime.now(UTC) + timedelta(hours=hours),
        open_count=0,
    )
    return link, token


async def create_connect_link(
    session: AsyncSession, *, tenant: Tenant, hours: int, actor: Actor, request_id: str | None = None
) -> tuple[ConnectLink, str]:
    """An expiring link for the tenant's admin; the token is returned once."""
    link, token = _new_link(tenant, hours=hours, actor=actor)
    session.add(link)
    await session.flush()
    await audit_log.record(session, "connect_link.create", actor, tenant_id=tenant.id, target=tenant.slug,
                           request_id=request_id, details={"link": str(link.id), "expires_at": link.expires_at.isoformat()})
    return link, token


async def find(session: AsyncSession, token: str) -> ConnectLink:
    """The link a token names (refusals aside); 404 for anything that is not one of ours."""
    if not token.startswith(PREFIX) or len(token) > 200:
        raise _invalid()
    link = await session.scalar(select(ConnectLink).where(ConnectLink.token_hash == token_hash(token)))
    if link is None:
        raise _invalid()
    return link


async def open_connect_link(session: AsyncSession, token: str, *, request_id: str | None = None) -> tuple[ConnectLink, Tenant]:
    """Check the link and count the open; spends nothing. Refused if revoked, expired or used."""
    link = await find(session, token)
    now = datetime.now(UTC)
    refused = refusal(link, now=now)
    if refused is not None:
        raise refused
    # One conditional UPDATE: concurrent opens all count, and a link revoked or spent since it was
    # read is refused (the row lock orders this against the spend and the revoke).
    counted = cast(CursorResult[Any], await session.execute(
        update(ConnectLink)
        .where(ConnectLink.id == link.id, ConnectLink.used_at.is_(None), ConnectLink.revoked_at.is_(None),
               ConnectLink.expires_at > now)
        .values(open_count=ConnectLink.open_count + 1, first_opened_at=func.coalesce(ConnectLink.first_opened_at, now))
        .execution_options(synchronize_session=False)
    ))
    await session.refresh(link)
    if counted.rowcount != 1:
        raise refusal(link) or _used()
    tenant = await get_tenant(session, link.tenant_id)
    await audit_log.record(session, "connect_link.open", Actor(ACTOR_LINK, str(link.id)), tenant_id=tenant.id,
                           target=tenant.slug, request_id=request_id, details={"open_count": link.open_count})
    return link, tenant


def _through_link(web_session: WebSession | None) -> uuid.UUID | None:
    """The link a connect-link session came through (None for people signed in, and for old sessions)."""
    if web_session is None or web_session.user_id is not None:
        return None
    return web_session.link_id


async def check_session(
    session: AsyncSession, web_session: WebSession | None, *, finished: bool = False, lock: bool = False
) -> None:
    """A connect-link session works only while its link does: refused once it is revoked, expired or used.

    ``finished``: the page shown after connecting, which is all a session of a spent link may still
    see. ``lock`` holds the link's row until the transaction ends (about to write a connection), so
    completions through one link queue and all but the first find it spent. A session with neither
    a person nor a link (one from before links were kept on their sessions) is refused outright.
    """
    if web_session is None or web_session.user_id is not None:
        return
    if web_session.link_id is None:
        raise _used()
    query = select(ConnectLink).where(ConnectLink.id == web_session.link_id).execution_options(populate_existing=True)
    link = await session.scalar(query.with_for_update() if lock else query)
    if link is None:
        raise _invalid()
    refused = refusal(link)
    if refused is not None and not (finished and link.used_at is not None):
        raise refused


async def spend_for_session(
    session: AsyncSession, web_session: WebSession | None, *, request_id: str | None = None
) -> ConnectLink | None:
    """Spend the link a connection was made through, in that connection's transaction.

    Called after the connection is written: if the link was revoked, expired or spent meanwhile
    (another opener finished first), this raises and the unit of work rolls the connection back.
    The session that spent it stays tied to the link: from now on it, like every other session of
    the link, may see only the "connected" page (``check_session(finished=True)``).
    """
    link_id = _through_link(web_session)
    if link_id is None or web_session is None:
        return None
    link = await session.scalar(
        select(ConnectLink).where(ConnectLink.id == link_id).with_for_update().execution_options(populate_existing=True)
    )
    if link is None:
        raise _invalid()
    refused = refusal(link)
    if refused is not None:
        raise refused
    if not await spend(session, ConnectLink.used_at, link.id):
        raise _used()
    tenant = await get_tenant(session, link.tenant_id)
    await audit_log.record(session, "connect_link.use", Actor(ACTOR_LINK, str(link.id)), tenant_id=tenant.id,
                           target=tenant.slug, request_id=request_id, details={"open_count": link.open_count})
    return link


async def list_links(session: AsyncSession, *, tenant_id: uuid.UUID, limit: int = 100) -> list[ConnectLink]:
    """A tenant's links, newest first, whatever their state."""
    rows = await session.scalars(
        select(ConnectLink).where(ConnectLink.tenant_id == tenant_id)
        .order_by(ConnectLink.created_at.desc(), ConnectLink.id).limit(limit)
    )
    return list(rows)


async def get_link(session: AsyncSession, *, tenant: Tenant, link_id: uuid.UUID) -> ConnectLink:
    link = await session.scalar(
        select(ConnectLink).where(ConnectLink.id == link_id, ConnectLink.tenant_id == tenant.id)
        .execution_options(populate_existing=True)
    )
    if link is None:
        raise NotFound("No such connect link for this tenant.", code="connect_link_not_found")
    return link


async def _close(session: AsyncSession, link: ConnectLink, *, actor: Actor) -> bool:
    """Revoke the row if nobody used it first, and end the browser sessions it started; True if we did."""
    now = datetime.now(UTC)
    result = cast(CursorResult[Any], await session.execute(
        update(ConnectLink)
        .where(ConnectLink.id == link.id, ConnectLink.used_at.is_(None), ConnectLink.revoked_at.is_(None))
        .values(revoked_at=now, revoked_by=_label(actor))
        .execution_options(synchronize_session=False)
    ))
    await session.refresh(link)
    if result.rowcount != 1:
        return False
    await session.execute(delete(WebSession).where(WebSession.link_id == link.id))
    return True


async def revoke(
    session: AsyncSession, *, tenant: Tenant, link_id: uuid.UUID, actor: Actor, request_id: str | None = None
) -> ConnectLink:
    """Revoke a link that was not used yet; its browser sessions end at once. Revoking twice is a no-op."""
    link = await get_link(session, tenant=tenant, link_id=link_id)
    closed = await _close(session, link, actor=actor) if link.used_at is None and link.revoked_at is None else False
    if link.used_at is not None:
        raise Conflict("This connect link was already used to connect; there is nothing to revoke.", code="connect_link_used")
    if closed:
        await audit_log.record(session, "connect_link.revoke", actor, tenant_id=tenant.id, target=tenant.slug,
                               request_id=request_id, details={"link": str(link.id), "open_count": link.open_count})
    return link


async def reissue(
    session: AsyncSession, *, tenant: Tenant, link_id: uuid.UUID, hours: int, actor: Actor, request_id: str | None = None
) -> tuple[ConnectLink, str]:
    """Revoke the link (if it still works) and issue a new one for the same tenant; the token is returned once."""
    old = await get_link(session, tenant=tenant, link_id=link_id)
    revoked = await _close(session, old, actor=actor) if old.used_at is None and old.revoked_at is None else False
    link, token = _new_link(tenant, hours=hours, actor=actor)
    session.add(link)
    await session.flush()
    await audit_log.record(session, "connect_link.reissue", actor, tenant_id=tenant.id, target=tenant.slug,
                           request_id=request_id, details={"link": str(link.id), "replaces": str(old.id),
                                                           "revoked": revoked, "expires_at": link.expires_at.isoformat()})
    return link, token
