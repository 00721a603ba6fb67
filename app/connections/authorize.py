"""Connecting a tenant through Salesmsg's OAuth2 authorization: state, PKCE, the callback.

The ``state`` is a server-side record: 256 random bits, stored as its SHA-256, single use,
ten minutes, bound to the browser session and the tenant, holding the requested scopes and the
PKCE verifier sealed under the tenant's data key. PHI scopes are checked against the database's
current BAA state (``policy``) at the consent submission and again at the callback, before the
exchange.

With tracing on (``app.core.tracing``), the callback is a ``salesmsg.connect`` span holding the
tenant and ``smc.connect.outcome`` (connected, reconnected, or the refusal's error code).
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiohttp
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import audit_log
from app.audit.audit_log import Actor
from app.connections import policy, scopes, token_client, transitions
from app.connections.token_client import TokenEndpointError
from app.connections.view import OAUTH
from app.core import tracing
from app.core.errors import (
    BAA_REQUIRED_MESSAGE,
    AppError,
    BadRequest,
    Forbidden,
    Gone,
    UpstreamError,
)
from app.core.models import Connection, OAuthState, Tenant, WebSession
from app.core.settings import Settings
from app.kit.single_use import spend
from app.kit.tokens import token_hash
from app.tenants.registry import get_tenant
from app.vault import tenant_keys
from app.vault.envelope import DataKeyCache

STATE_TTL = timedelta(minutes=10)


async def start_authorization(
    session: AsyncSession,
    *,
    settings: Settings,
    data_keys: DataKeyCache,
    tenant: Tenant,
    web_session: WebSession,
    requested: list[str],
    actor: Actor,
    request_id: str | None = None,
) -> str:
    """Check the scopes against the tenant's current BAA state, store the state, build Salesmsg's URL."""
    try:
        chosen = policy.requestable(requested, tenant=tenant, kind=OAUTH, offer_unlisted=settings.offer_unlisted_phi_scopes)
    except policy.ScopeError as exc:
        await audit_log.record(
            session, "connection.authorize", actor, outcome="denied", tenant_id=tenant.id, target=tenant.slug,
            request_id=request_id, details={"reason": exc.code, "scopes": exc.scopes},
        )
        await session.commit()
        raise exc.as_app_error() from exc
    state = secrets.token_urlsafe(32)
    verifier = token_client.new_code_verifier() if settings.salesmsg_pkce else None
    key = await tenant_keys.data_key_for(session, data_keys, tenant.id)
    row = OAuthState(
        id=uuid.uuid4(),
        state_hash=token_hash(state),
        session_id=web_session.id,
        tenant_id=tenant.id,
        scopes=scopes.format_scopes(chosen),
        created_by=actor.id or actor.type,
        expires_at=datetime.now(UTC) + STATE_TTL,
    )
    if verifier:
        row.pkce_verifier_ct = key.seal(verifier, owner=row.id, field="pkce_verifier")
    session.add(row)
    await audit_log.record(
        session, "connection.authorize", actor, tenant_id=tenant.id, target=tenant.slug, request_id=request_id,
        details={"scopes": chosen},
    )
    return token_client.authorization_url(settings, scopes=chosen, state=state, code_verifier=verifier)


_CALLBACK_ERRORS = {
    "access_denied": ("You declined the connection at Salesmsg, so nothing was connected.", "Connection declined"),
    "invalid_scope": ("Salesmsg did not accept the requested scopes, so nothing was connected.", "Scopes not accepted"),
}


@dataclass
class CallbackResult:
    tenant: Tenant
    connection: Connection
    reconnected: bool


async def _consume_state(
    session: AsyncSession, web_session: WebSession | None, state: str | None
) -> tuple[OAuthState, bytes | None]:
    """Find the state and spend it; returns it with its sealed PKCE verifier (now wiped)."""
    if not state or len(state) > 200:
        raise BadRequest("The sign-in response carries no valid state. Start the connection again.", code="invalid_state")
    row = await session.scalar(select(OAuthState).where(OAuthState.state_hash == token_hash(state)))
    if row is None:
        raise BadRequest("This sign-in response was not started here. Start the connection again.", code="invalid_state")
    if web_session is None or row.session_id != web_session.id:
        raise BadRequest(
            "This sign-in response belongs to another browser session. Start the connection again from this browser.",
            code="state_session_mismatch",
        )
    used = BadRequest("This sign-in response was already used. Start the connection again.", code="state_used")
    if row.consumed_at is not None:
        raise used
    if row.expires_at <= datetime.now(UTC):
        raise Gone("The sign-in took too long and expired. Start the connection again.", code="state_expired")
    verifier_ct = row.pkce_verifier_ct
    if not await spend(session, OAuthState.consumed_at, row.id, pkce_verifier_ct=None):
        raise used
    return row, verifier_ct


def _connect_outcome(result: CallbackResult) -> str:
    return "reconnected" if result.reconnected else "connected"


@tracing.traced("salesmsg.connect", tracing.CONNECT_OUTCOME, _connect_outcome)
async def complete_authorization(
    session: AsyncSession,
    *,
    settings: Settings,
    http: aiohttp.ClientSession,
    data_keys: DataKeyCache,
    web_session: WebSession | None,
    params: Mapping[str, str],
    actor: Actor,
    request_id: str | None = None,
) -> CallbackResult:
    """Handle the redirect back from Salesmsg: consume the state once, exchange, store, audit."""
    row, verifier_ct = await _consume_state(session, web_session, params.get("state"))
    requested = row.scopes.split()
    # The state is spent whatever happens next: commit that before anything can fail.
    await session.commit()
    tenant = await get_tenant(session, row.tenant_id)
    tracing.annotate({tracing.TENANT_ID: str(tenant.id)})

    async def refuse(error: AppError, reason: str) -> AppError:
        await audit_log.record(
            session, "connection.connect", actor, outcome="denied", tenant_id=tenant.id, target=tenant.slug,
            request_id=request_id, details={"reason": reason},
        )
        await session.commit()
        return error

    upstream_error = params.get("error")
    if upstream_error:
        message, title = _CALLBACK_ERRORS.get(
            upstream_error, ("Salesmsg did not complete the connection, so nothing was connected.", "Not connected")
        )
        error = BadRequest(message, code=upstream_error if upstream_error in _CALLBACK_ERRORS else "authorization_failed")
        error.title = title
        raise await refuse(error, upstream_error[:64])
    code = params.get("code")
    if not code or len(code) > 2048:
        raise await refuse(BadRequest("The sign-in response carries no code.", code="invalid_callback"), "no_code")
    try:
        policy.requestable(requested, tenant=tenant, kind=OAUTH, offer_unlisted=settings.offer_unlisted_phi_scopes)
    except policy.ScopeError as exc:
        raise await refuse(exc.as_app_error(), exc.code) from exc
    key = await tenant_keys.load_data_key(session, data_keys, tenant.id)
    verifier = key.open_text(verifier_ct, owner=row.id, field="pkce_verifier") if verifier_ct else None
    try:
        token = await token_client.exchange_code(settings, code=code, code_verifier=verifier)
    except TokenEndpointError as exc:
        if exc.kind == "baa_required":
            raise await refuse(
                Forbidden(BAA_REQUIRED_MESSAGE, code="baa_required",
                          hint="Salesmsg has no BAA on file for this integration and this HIPAA organization."),
                "baa_required",
            ) from exc
        if exc.transient:
            raise await refuse(UpstreamError("Salesmsg could not complete the sign-in; try again in a moment."), "upstream") from exc
        raise await refuse(
            BadRequest("Salesmsg refused the sign-in code; start the connection again.", code="exchange_failed"),
            exc.error or "exchange_failed",
        ) from exc
    granted = scopes.parse(token.scope) if token.scope else requested
    conn, existed = await transitions.connected(
        session, tenant=tenant, key=key, kind=OAUTH, access_token=token.access_token, refresh_token=token.refresh_token,
        expires_in=token.expires_in, granted_scopes=granted, actor=actor, request_id=request_id,
        profile=await read_profile(http, settings, token.access_token, set(granted)),
    )
    return CallbackResult(tenant, conn, existed)


async def read_profile(http: aiohttp.ClientSession, settings: Settings, access_token: str, granted: set[str]) -> transitions.Profile:
    """Who connected and which org (``GET /users/me``, ``GET /organization/current``, each only when
    its scope was granted); best effort, never fatal: a field Salesmsg does not send stays None."""
    found: dict[str, str | None] = {}
    if "users:read" in granted:
        me = await _fetch_object(http, settings, "/users/me", access_token)
        if me is not None:
            found["salesmsg_user"] = _text(me.get("email")) or _text(me.get("full_name")) or _text(me.get("name"))
            found["salesmsg_user_id"] = _ident(me.get("id"))
            org = me.get("organization")
            if isinstance(org, dict):
                found["salesmsg_org"], found["salesmsg_org_id"] = _text(org.get("name")), _ident(org.get("id"))
            else:
                found["salesmsg_org_id"] = _ident(me.get("organization_id"))
    if "organizations:read" in granted:
        org = await _fetch_object(http, settings, "/organization/current", access_token)
        if org is not None and _ident(org.get("id")):
            found["salesmsg_org"], found["salesmsg_org_id"] = _text(org.get("name")) or found.get("salesmsg_org"), _ident(org.get("id"))
    return transitions.Profile(**found)


async def _fetch_object(http: aiohttp.ClientSession, settings: Settings, path: str, access_token: str) -> dict | None:
    """The JSON object at ``path`` (unwrapping a ``data`` envelope), or None on any failure."""
    status, raw = await token_client.get_with_token(http, settings, path, token=access_token, timeout=5)
    try:
        body = json.loads(raw) if status == 200 else None
    except (ValueError, RecursionError):
        return None
    if isinstance(body, dict) and isinstance(body.get("data"), dict):
        body = body["data"]
    return body if isinstance(body, dict) else None


def _text(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    return " ".join(value.split())[:200] or None


def _ident(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    text = str(value).strip()
    return text[:64] if text and text.isprintable() else None


async def forget_expired_states(session: AsyncSession, *, older_than: timedelta = timedelta(days=1)) -> None:
    """States live ten minutes; the worker drops them a while after they expire."""
    await session.execute(delete(OAuthState).where(OAuthState.expires_at < datetime.now(UTC) - older_than))
