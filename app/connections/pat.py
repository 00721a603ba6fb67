"""Connecting a tenant with a personal access token an org member pastes in.

One cheap API call proves the token works before it is stored; then, as for an OAuth connect,
the Salesmsg user and org are read (``authorize.read_profile``: best effort, a scope the token lacks
just leaves them unknown), so an org change or an org another tenant holds is flagged the same way. PAT connections are an org
member's own access and are not BAA-gated (``policy``: Salesmsg's rule).
"""

from __future__ import annotations

import json
from dataclasses import replace

import aiohttp
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit.audit_log import Actor
from app.connections import policy, token_client, transitions
from app.connections.authorize import read_profile
from app.connections.view import PAT
from app.core.errors import UpstreamError, ValidationFailed
from app.core.models import Connection, Tenant
from app.core.settings import Settings
from app.vault import tenant_keys
from app.vault.envelope import DataKeyCache


async def connect_with_pat(
    session: AsyncSession,
    *,
    settings: Settings,
    http: aiohttp.ClientSession,
    data_keys: DataKeyCache,
    tenant: Tenant,
    token: str,
    granted: list[str],
    actor: Actor,
    request_id: str | None = None,
) -> Connection:
    """Store a personal access token after one cheap API call proves it works."""
    token = token.strip()
    if not 16 <= len(token) <= 4096 or any(c.isspace() for c in token):
        raise ValidationFailed("Paste the whole personal access token.", code="invalid_token")
    try:
        chosen = policy.requestable(granted, tenant=tenant, kind=PAT, offer_unlisted=settings.offer_unlisted_phi_scopes)
    except policy.ScopeError as exc:
        raise exc.as_app_error() from exc
    status, label = await _check(http, settings, token)
    if status in (401, 403):
        raise ValidationFailed("Salesmsg did not accept this token.", code="invalid_token")
    if status is None or status >= 500:
        raise UpstreamError("Salesmsg could not be reached to check the token; try again.")
    profile = await read_profile(http, settings, token, {"users:read", "organizations:read"} if label else {"organizations:read"})
    if profile.salesmsg_user is None and label:
        profile = replace(profile, salesmsg_user=label)
    key = await tenant_keys.data_key_for(session, data_keys, tenant.id)
    conn, _ = await transitions.connected(
        session, tenant=tenant, key=key, kind=PAT, access_token=token, refresh_token=None, expires_in=None,
        granted_scopes=chosen, actor=actor, request_id=request_id, profile=profile,
    )
    return conn


async def _check(http: aiohttp.ClientSession, settings: Settings, token: str) -> tuple[int | None, str | None]:
    """The status of ``GET /users/me`` with the token, and who it is. 401, or a 403 that is not
    about scope, means the token does not authenticate; a 403 ``insufficient_scope`` means it
    does (it just lacks ``users:read``)."""
    status, raw = await token_client.get_with_token(http, settings, "/users/me", token=token, timeout=10)
    if status == 403 and b"insufficient_scope" in raw:
        return 200, None
    label = None
    if status == 200:
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if isinstance(body, dict):
            label = body.get("email") or body.get("name")
    return status, str(label)[:200] if label else None
