"""API-key authentication for the management API (the proxy has its own lean copy of the rules)."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.audit.audit_log import ACTOR_API_KEY, Actor
from app.core.errors import BadRequest, Forbidden, NotFound, Unauthorized
from app.core.models import ApiKey, Tenant
from app.deps import RuntimeDep, SessionDep
from app.identity import api_keys
from app.kit.tokens import hash_matches
from app.tenants.registry import get_tenant

_KEY_IN_QUERY = re.compile(r"^(api_key|apikey|key|access_token|token)$", re.IGNORECASE)


@dataclass
class Caller:
    key: ApiKey
    tenant_ids: set[uuid.UUID] | None  # None: every tenant

    @property
    def actor(self) -> Actor:
        return Actor(ACTOR_API_KEY, str(self.key.id))

    def covers(self, tenant: Tenant) -> bool:
        return self.tenant_ids is None or tenant.id in self.tenant_ids


_documented_bearer = HTTPBearer(auto_error=False, scheme_name="ApiKey", description="An API key: `smc_live_<prefix>_<secret>`")


async def api_caller(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    _bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_documented_bearer)] = None,
) -> Caller:
    """The key behind ``Authorization: Bearer``; the parameter above only documents the scheme."""
    if any(_KEY_IN_QUERY.match(name) for name in request.query_params.keys()):
        raise BadRequest("Send the API key in the Authorization header, never in the URL.", code="api_key_in_query")
    header = request.headers.get("authorization")
    unauthorized = Unauthorized("The API key is missing or not valid.", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if not header:
        raise Unauthorized("Send 'Authorization: Bearer <api key>'.", code="missing_api_key", headers={"WWW-Authenticate": "Bearer"})
    kind, _, presented = header.partition(" ")
    prefix = api_keys.parse(presented.strip()) if kind.lower() == "bearer" else None
    if prefix is None:
        raise unauthorized
    key = await api_keys.find_by_prefix(session, prefix)
    if key is None or key.revoked_at is not None or not hash_matches(key.key_hash, presented.strip()):
        raise unauthorized
    runtime.usage.touch(key.id, key.last_used_at)
    return Caller(key, await api_keys.covered_tenant_ids(session, key))


async def writer(caller: Annotated[Caller, Depends(api_caller)]) -> Caller:
    if caller.key.read_only:
        raise Forbidden("This API key is read-only.", code="read_only_key")
    return caller


async def operator(caller: Annotated[Caller, Depends(api_caller)]) -> Caller:
    if not caller.key.operator:
        raise Forbidden("Only an operator API key may do this.", code="operator_key_required")
    return caller


CallerDep = Annotated[Caller, Depends(api_caller)]
WriterDep = Annotated[Caller, Depends(writer)]
OperatorDep = Annotated[Caller, Depends(operator)]


async def tenant_of(session, caller: Caller, ref: str, *, for_update: bool = False) -> Tenant:
    """The tenant by id or slug, if the key covers it; 404 otherwise (no probing)."""
    try:
        tenant = await get_tenant(session, ref, for_update=for_update)
    except NotFound:
        raise NotFound("No such tenant for this key.", code="tenant_not_found") from None
    if not caller.covers(tenant):
        raise NotFound("No such tenant for this key.", code="tenant_not_found")
    return tenant
