"""Connecting a tenant: the OAuth2 authorization (state, PKCE, callback) and PAT connections.

The ``state`` is a server-side record: 256 random bits, stored as its SHA-256, single use,
ten minutes, bound to the browser session and the tenant, holding the requested scopes and the
PKCE verifier sealed under the tenant's data key. PHI scopes are checked against the database's
current BAA state at the consent submission and again at the callback, before the exchange.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aiohttp
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import audit_log
from app.audit.audit_log import Actor
from app.connections import events, scopes, store, token_client
from app.connections.token_client import TokenEndpointError
from app.core.errors import (
    BAA_REQUIRED_MESSAGE,
    AppError,
    BadRequest,
    Forbidden,
    Gone,
    UpstreamError,
    ValidationFailed,
)
from app.core.models import Connection, ConnectLink, OAuthState, Tenant, WebSession
from app.identity.people import new_token, token_hash
from app.runtime import Runtime
from app.tenants.registry import get_tenant
from app.vault import tenant_keys

STATE_TTL = timedelta(minutes=10)


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def scope_error(exc: scopes.ScopeError) -> AppError:
    if exc.code == "baa_required":
        return Forbidden(
            str(exc),
            code="baa_required",
            hint="An operator must record the signed BAA for this organization before PHI scopes can be granted.",
            extra={"scopes": exc.scopes},
        )
    return ValidationFailed(str(exc), code=exc.code, extra={"scopes": exc.scopes})


async def start_authorization(
    session: AsyncSession,
    runtime: Runtime,
    *,
    tenant: Tenant,
    web_session: WebSession,
    requested: list[str],
    actor: Actor,
    request_id: str | None = None,
) -> str:
    """Validate the scopes against the tenant's current BAA state, store the state, build the URL."""
    try:
        chosen = scopes.validate_request(requested, phi_allowed=tenant.phi_allowed)
    except scopes.ScopeError as exc:
        await audit_log.record(
            session, "connection.authorize", actor, outcome="denied", tenant_id=tenant.id, target=tenant.slug,
            request_id=request_id, details={"reason": exc.code, "scopes": exc.scopes},
        )
        await session.commit()
        raise scope_error(exc) from exc
    state = secrets.token_urlsafe(32)
    verifier = token_client.new_code_verifier() if runtime.settings.salesmsg_pkce else None
    key = await tenant_keys.data_key_for(session, runtime.data_keys, tenant.id)
    row = OAuthState(
        id=uuid.uuid4(),
        state_hash=_hash(state),
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
    return token_client.authorization_url(runtime.settings, scopes=chosen, state=state, code_verifier=verifier)


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
    row = await session.scalar(select(OAuthState).where(OAuthState.state_hash == _hash(state)))
    if row is None:
        raise BadRequest("This sign-in response was not started here. Start the connection again.", code="invalid_state")
    if web_session is None or row.session_id != web_session.id:
        raise BadRequest(
            "This sign-in response belongs to another browser session. Start the connection again from this browser.",
            code="state_session_mismatch",
        )
    if row.consumed_at is not None:
        raise BadRequest("This sign-in response was already used. Start the connection again.", code="state_used")
    if row.expires_at <= datetime.now(UTC):
        raise Gone("The sign-in took too long and expired. Start the connection again.", code="state_expired")
    verifier_ct = row.pkce_verifier_ct
    claimed = await session.execute(
        update(OAuthState)
        .where(OAuthState.id == row.id, OAuthState.consumed_at.is_(None))
        .values(consumed_at=datetime.now(UTC), pkce_verifier_ct=None)
    )
    if claimed.rowcount != 1:
        raise BadRequest("This sign-in response was already used. Start the connection again.", code="state_used")
    return row, verifier_ct


async def complete_authorization(
    session: AsyncSession,
    runtime: Runtime,
    *,
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
        scopes.validate_request(requested, phi_allowed=tenant.phi_allowed)
    except scopes.ScopeError as exc:
        raise await refuse(scope_error(exc), exc.code) from exc
    key = await tenant_keys.load_data_key(session, runtime.data_keys, tenant.id)
    verifier = key.open_text(verifier_ct, owner=row.id, field="pkce_verifier") if verifier_ct else None
    try:
        token = await token_client.exchange_code(runtime.settings, code=code, code_verifier=verifier)
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
    profile = await _profile(runtime, token.access_token, set(granted))
    conn, existed = await store.store_new_grant(
        session,
        tenant=tenant,
        key=key,
        kind="oauth",
        access_token=token.access_token,
        refresh_token=token.refresh_token,
        expires_in=token.expires_in,
        granted_scopes=granted,
        connected_by=actor.id or actor.type,
        **profile,
    )
    await events.emit(
        session, tenant_id=tenant.id, connection_id=conn.id, type="connected",
        data={"kind": "oauth", "scopes": granted, "reconnect": existed},
    )
    await audit_log.record(
        session, "connection.connect", actor, tenant_id=tenant.id, target=tenant.slug, request_id=request_id,
        details={"kind": "oauth", "scopes": granted, "reconnect": existed},
    )
    return CallbackResult(tenant, conn, existed)


async def _profile(runtime: Runtime, access_token: str, granted: set[str]) -> dict[str, str | None]:
    """Who connected and which org, for the dashboard; best effort, never fatal."""
    found: dict[str, str | None] = {"salesmsg_user": None, "salesmsg_org": None}
    checks = [("users:read", "/users/me", "salesmsg_user"), ("organizations:read", "/organization/current", "salesmsg_org")]
    for scope, path, field in checks:
        if scope not in granted:
            continue
        body = await _get_json(runtime.http, runtime.settings.salesmsg_api_base + path, access_token)
        if isinstance(body, dict):
            label = body.get("email") or body.get("name") or body.get("full_name")
            if label is None and isinstance(body.get("data"), dict):
                label = body["data"].get("name") or body["data"].get("email")
            found[field] = str(label)[:200] if label else None
    return found


async def _get_json(http: aiohttp.ClientSession, url: str, token: str) -> object:
    try:
        async with http.get(
            url, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=aiohttp.ClientTimeout(total=5), allow_redirects=False, auto_decompress=True,
        ) as resp:
            if resp.status != 200:
                return None
            return await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def connect_with_pat(
    session: AsyncSession,
    runtime: Runtime,
    *,
    tenant: Tenant,
    token: str,
    granted: list[str],
    actor: Actor,
    request_id: str | None = None,
) -> Connection:
    """Store a Personal Access Token after one cheap API call proves it works.

    PAT connections are an org member's own access and are not BAA-gated (Salesmsg's rule).
    """
    token = token.strip()
    if not 16 <= len(token) <= 4096 or any(c.isspace() for c in token):
        raise ValidationFailed("Paste the whole personal access token.", code="invalid_token")
    try:
        chosen = scopes.validate_request(granted, phi_allowed=True)
    except scopes.ScopeError as exc:
        raise scope_error(exc) from exc
    status, label = await _check_pat(runtime, token)
    if status in (401, 403):
        raise ValidationFailed("Salesmsg did not accept this token.", code="invalid_token")
    if status is None or status >= 500:
        raise UpstreamError("Salesmsg could not be reached to check the token; try again.")
    key = await tenant_keys.data_key_for(session, runtime.data_keys, tenant.id)
    conn, existed = await store.store_new_grant(
        session, tenant=tenant, key=key, kind="pat", access_token=token, refresh_token=None, expires_in=None,
        granted_scopes=chosen, connected_by=actor.id or actor.type, salesmsg_user=label,
    )
    await events.emit(session, tenant_id=tenant.id, connection_id=conn.id, type="connected",
                      data={"kind": "pat", "scopes": chosen, "reconnect": existed})
    await audit_log.record(session, "connection.connect", actor, tenant_id=tenant.id, target=tenant.slug,
                       request_id=request_id, details={"kind": "pat", "scopes": chosen, "reconnect": existed})
    return conn


async def _check_pat(runtime: Runtime, token: str) -> tuple[int | None, str | None]:
    """One cheap call. 401, or a 403 that is not about scope, means the token does not authenticate;
    a 403 ``insufficient_scope`` means it does (it just lacks ``users:read``)."""
    try:
        async with runtime.http.get(
            runtime.settings.salesmsg_api_base + "/users/me",
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=aiohttp.ClientTimeout(total=10), allow_redirects=False, auto_decompress=True,
        ) as resp:
            label = None
            raw = await resp.read()
            if resp.status == 403 and b"insufficient_scope" in raw:
                return 200, None
            if resp.status == 200:
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                if isinstance(body, dict):
                    label = body.get("email") or body.get("name")
            return resp.status, str(label)[:200] if label else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None, None


# Connect links ---------------------------------------------------------------------------


async def create_connect_link(
    session: AsyncSession, *, tenant: Tenant, hours: int, actor: Actor, request_id: str | None = None
) -> tuple[ConnectLink, str]:
    """A single-use, expiring link for the tenant's admin; the token is returned once."""
    token = new_token("smc_link_")
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
    """Spend the link (once); the caller turns it into a browser session bound to the tenant."""
    if not token.startswith("smc_link_") or len(token) > 200:
        raise BadRequest("This connect link is not valid.", code="connect_link_invalid")
    link = await session.scalar(select(ConnectLink).where(ConnectLink.token_hash == token_hash(token)))
    if link is None:
        raise BadRequest("This connect link is not valid.", code="connect_link_invalid")
    if link.used_at is not None:
        raise Gone("This connect link was already used. Ask for a new one.", code="connect_link_used")
    if link.expires_at <= datetime.now(UTC):
        raise Gone("This connect link has expired. Ask for a new one.", code="connect_link_expired")
    claimed = await session.execute(
        update(ConnectLink).where(ConnectLink.id == link.id, ConnectLink.used_at.is_(None)).values(used_at=datetime.now(UTC))
    )
    if claimed.rowcount != 1:
        raise Gone("This connect link was already used. Ask for a new one.", code="connect_link_used")
    tenant = await get_tenant(session, link.tenant_id)
    await audit_log.record(session, "connect_link.redeem", Actor(audit_log.ACTOR_LINK, str(link.id)), tenant_id=tenant.id,
                       target=tenant.slug, request_id=request_id)
    return tenant
