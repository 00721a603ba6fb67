"""The REST proxy: ``/api/v1/tenants/{tenant}/proxy/{path}`` to ``SMC_SALESMSG_API_BASE/{path}``.

The hot path: a plain ASGI handler that our outermost middleware (``app.core.middleware``) calls
before FastAPI's router; one database round trip per request (``grants``), the pooled aiohttp
session upstream, bodies relayed as bytes.

Rules, in order, before anything reaches Salesmsg: a well-formed key in the Authorization header
(never the query string); a safe path under the API base; a known endpoint (fail closed); the
key is valid and covers the tenant; the rate limits; a read-only key only calls reads (by the
endpoint's scope, so ``POST /contacts/list`` reads); the gate (``connections.policy.decide``: the
connection is active, the endpoint's scope is granted, a PHI scope on a HIPAA tenant needs a signed
BAA); a PHI call can be audited.
"""

from __future__ import annotations

import re
import time
from typing import Any
from urllib.parse import unquote

from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from app.audit.audit_log import ACTOR_API_KEY, Actor, AuditRecord
from app.audit.writer import AuditWriter
from app.connections import policy, scopes
from app.connections.view import ConnectionView
from app.core.errors import AppError, Refusal, error_json
from app.core.input_rules import check_host, check_json, check_url, is_json
from app.core.logs import get_logger
from app.core.metrics import PROXY_DENIALS, REQUEST_SECONDS, REQUESTS, child
from app.core.settings import Settings
from app.core.tracing import ENDPOINT, TENANT_ID, UPSTREAM_STATUS, annotate
from app.identity import api_keys
from app.identity.key_usage import UsageRecorder
from app.kit.tokens import hash_matches
from app.proxy.endpoint_scopes import Endpoint, resolve
from app.proxy.grants import Grant, GrantLookup
from app.proxy.idempotency import Idempotency, fingerprint, valid_key
from app.proxy.rate_limits import RateLimits
from app.proxy.upstream import Answer, Upstream
from app.vault.envelope import DataKey, DataKeyCache, VaultError

log = get_logger(__name__)

PREFIX = "/api/v1/tenants/"
ROUTE = "/api/v1/tenants/{tenant}/proxy/{path}"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
SAFE_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
SAFE_QUERY = re.compile(rb"[\x21-\x7e]*")
FORWARD_REQUEST_HEADERS = frozenset({"content-type", "accept", "accept-language", "if-none-match", "if-modified-since"})
QUERY_KEY_NAMES = re.compile(rb"(?:^|&)(api_key|apikey|key|access_token|token)=", re.IGNORECASE)
_INVALID_KEY = (401, "invalid_api_key", "The API key is not valid.", {"WWW-Authenticate": "Bearer"})


def safe_path(raw_tail: bytes) -> str:
    """Decode the path once and keep it strictly under the API base, or refuse."""
    try:
        text = raw_tail.decode("ascii")
    except UnicodeDecodeError:
        raise Refusal(400, "invalid_path", "The path is not plain ASCII.") from None
    decoded = unquote(text)
    if "%" in decoded:
        raise Refusal(400, "invalid_path", "Encoded characters in the path are not allowed.")
    if not decoded or len(decoded) > 1024:
        raise Refusal(400, "invalid_path", "The path is empty or too long.")
    for segment in decoded.split("/"):
        if segment in ("", ".", "..") or not SAFE_SEGMENT.fullmatch(segment):
            raise Refusal(400, "invalid_path", "The path may hold only letters, digits, '-', '_' and '.' between single slashes.")
    return decoded


def _split(scope: Scope) -> tuple[str, bytes]:
    """The tenant reference and the raw path after ``/proxy/``."""
    raw = scope.get("raw_path") or scope["path"].encode()
    rest = raw.split(b"?", 1)[0][len(PREFIX):]
    tenant, sep, tail = rest.partition(b"/proxy/")
    if not sep or not tenant or b"/" in tenant:
        raise Refusal(404, "not_found", "Nothing was found here.")
    try:
        return unquote(tenant.decode("ascii")), tail
    except UnicodeDecodeError:
        raise Refusal(404, "tenant_not_found", "No such tenant for this key.") from None


def _bearer(headers: Headers) -> str | None:
    """The bearer credential; "" when the header is there but holds none; None when absent."""
    value = headers.get("authorization")
    if value is None:
        return None
    kind, _, token = value.partition(" ")
    return token.strip() if kind.lower() == "bearer" and token.strip() else ""


class Proxy:
    """The per-process proxy service; ``handle`` is the ASGI entry point."""

    def __init__(
        self,
        *,
        settings: Settings,
        grants: GrantLookup,
        upstream: Upstream,
        idempotency: Idempotency,
        data_keys: DataKeyCache,
        audit_writer: AuditWriter,
        usage: UsageRecorder,
        rate_limits: RateLimits,
        traced: bool = False,
    ) -> None:
        self.settings = settings
        self.traced = traced  # tracing is on (app.core.tracing): the server span gets our attributes
        self.grants = grants
        self.upstream = upstream
        self.data_keys = data_keys
        self.audit = audit_writer
        self.usage = usage
        self.rate_limits = rate_limits
        self.idempotency = idempotency

    # -- ASGI ---------------------------------------------------------------------------------

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        method = scope["method"]
        request_id = scope.setdefault("state", {}).get("request_id", "")
        context: dict[str, Any] = {"endpoint": None, "grant": None, "prefix": None}
        try:
            status, headers, body = await self._serve(scope, receive, method, request_id, context)
        except AppError as exc:  # our refusals, and the refresh engine's 409 needs_reauth / 503
            PROXY_DENIALS.labels(exc.code).inc()
            status, body = exc.status_code, error_json(exc.code, exc.message)
            headers = [(b"content-type", b"application/json"), *((k.lower().encode(), v.encode()) for k, v in exc.headers.items())]
            self._audit(context, method, request_id, status, started, decision=exc.code)
        if self.traced:  # before the answer: the server span ends with it
            self._annotate(context)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
        child(REQUESTS, ROUTE, method, str(status)).inc()
        child(REQUEST_SECONDS, ROUTE).observe(time.perf_counter() - started)

    async def _serve(
        self, scope: Scope, receive: Receive, method: str, request_id: str, context: dict[str, Any]
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        started = time.perf_counter()
        refusal = check_host(scope)
        if refusal is not None:
            raise refusal
        if method not in METHODS:
            raise Refusal(405, "method_not_allowed", "That method is not proxied.")
        query: bytes = scope.get("query_string", b"")
        if QUERY_KEY_NAMES.search(query):
            raise Refusal(400, "api_key_in_query", "Send the API key in the Authorization header, never in the URL.")
        if len(query) > 4096 or not SAFE_QUERY.fullmatch(query):
            raise Refusal(400, "invalid_query", "The query string is too long or holds invalid characters.")
        tenant_ref, raw_tail = _split(scope)
        headers = Headers(scope=scope)
        presented = _bearer(headers)
        prefix = api_keys.parse(presented) if presented else None
        context["prefix"] = prefix
        path = safe_path(raw_tail)
        endpoint = resolve(method, path)
        if endpoint is None:
            raise Refusal(404, "unknown_endpoint", "This Salesmsg endpoint is not one the proxy knows; it is refused.")
        context["endpoint"] = endpoint
        refusal = check_url(scope)  # a NUL in the tenant reference or the query (audited: the endpoint is known)
        if refusal is not None:
            raise refusal
        if presented is None:
            raise Refusal(401, "missing_api_key", "Send 'Authorization: Bearer <api key>'.", {"WWW-Authenticate": "Bearer"})
        if prefix is None:
            raise Refusal(*_INVALID_KEY)
        grant = await self.grants.find(prefix, tenant_ref)
        if grant is None or grant.revoked_at is not None or not hash_matches(grant.key_hash, presented):
            context["prefix"] = None if grant is None else prefix
            raise Refusal(*_INVALID_KEY)
        context["grant"] = grant
        self.usage.touch(grant.key_id, grant.last_used_at)
        if grant.tenant_id is None or not (grant.all_tenants or grant.covered):
            raise Refusal(404, "tenant_not_found", "No such tenant for this key.")
        wait = await self.rate_limits.check(key_id=grant.key_id, tenant_id=grant.tenant_id)
        if wait is not None:
            raise Refusal(429, "rate_limited", "Too many requests for this key or tenant.", {"Retry-After": str(wait)})
        if grant.read_only and not endpoint.reads:
            raise Refusal(403, "read_only_key", "This API key is read-only.")
        access = grant.access()
        policy.decide(access, endpoint.scope)
        conn = access.connection
        assert conn is not None  # the gate refuses a missing connection
        if self.audit.full and scopes.is_phi(endpoint.scope):
            raise Refusal(503, "audit_unavailable", "PHI access cannot be audited right now; try again shortly.",
                          {"Retry-After": "5"})
        body = await self._body(headers, receive)
        if body and is_json(headers.get("content-type")):
            refusal = check_json(body)  # a duplicate key or a NUL is refused here as everywhere else
            if refusal is not None:
                raise refusal
        key = self._data_key(grant)
        forwarded = {name: value for name, value in headers.items() if name in FORWARD_REQUEST_HEADERS}

        async def forward() -> Answer:
            answer = await self._forward(conn, key, method, path, query, body, forwarded, request_id, f"key:{grant.key_id}")
            context["upstream_status"] = answer.upstream_status
            return answer

        idem_key = headers.get("idempotency-key")
        decision = "allowed"
        if idem_key is not None and method == "POST":
            if not valid_key(idem_key):
                raise Refusal(400, "invalid_idempotency_key", "An Idempotency-Key is 1-255 printable ASCII characters.")
            answer, replayed = await self.idempotency.once(
                tenant_id=grant.tenant_id, key=idem_key, fp=fingerprint(method, path, query, body), data_key=key, call=forward,
            )
            decision = "replayed" if replayed else decision
        else:
            answer = await forward()
        self._audit(context, method, request_id, answer.status, started, decision=decision)
        return answer.status, answer.headers, answer.body

    # -- pieces -------------------------------------------------------------------------------

    def _data_key(self, grant: Grant) -> DataKey:
        if grant.data_key_id is None or grant.master_key_id is None or grant.wrapped_key is None or grant.tenant_id is None:
            raise Refusal(409, "not_connected", "The tenant's keys were shredded; connect again.")
        try:
            return self.data_keys.get(key_id=grant.data_key_id, tenant_id=grant.tenant_id, master_key_id=grant.master_key_id,
                                      wrapped=grant.wrapped_key)
        except VaultError:
            log.error("data key does not open", tenant_id=str(grant.tenant_id))
            raise Refusal(503, "vault_unavailable", "The tenant's token cannot be opened; an operator must check the keys.") from None

    async def _body(self, headers: Headers, receive: Receive) -> bytes:
        limit = self.settings.proxy_max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise Refusal(413, "payload_too_large", f"The body is over {limit} bytes.")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Refusal(400, "client_disconnected", "The client went away.")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise Refusal(413, "payload_too_large", f"The body is over {limit} bytes.")
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _forward(
        self, conn: ConnectionView, key: DataKey, method: str, path: str, query: bytes, body: bytes,
        headers: dict[str, str], request_id: str, caller: str,
    ) -> Answer:
        """Only the caller's content headers go upstream (``FORWARD_REQUEST_HEADERS``): its
        Authorization, Cookie, Host, X-Forwarded-*, hop-by-hop and every other header stay here."""
        return await self.upstream.call(conn, key, method=method, path=path, query=query, body=body, headers=headers,
                                        request_id=request_id, caller=caller)

    @staticmethod
    def _annotate(context: dict[str, Any]) -> None:
        """The tenant, the upstream template and Salesmsg's status (when it answered) on the server span."""
        endpoint: Endpoint | None = context.get("endpoint")
        grant: Grant | None = context.get("grant")
        annotate({
            TENANT_ID: str(grant.tenant_id) if grant is not None and grant.tenant_id is not None else None,
            ENDPOINT: endpoint.template if endpoint is not None else None,
            UPSTREAM_STATUS: context.get("upstream_status"),
        })

    def _audit(self, context: dict[str, Any], method: str, request_id: str, status: int, started: float, *, decision: str) -> None:
        """Every call that touches a PHI scope, allowed or denied: never a body, never query values."""
        endpoint: Endpoint | None = context.get("endpoint")
        if endpoint is None or not scopes.is_phi(endpoint.scope):
            return
        grant: Grant | None = context.get("grant")
        actor_id = str(grant.key_id) if grant is not None else (f"prefix:{context['prefix']}" if context.get("prefix") else None)
        self.audit.add(
            AuditRecord(
                action="proxy.phi_access",
                actor=Actor(ACTOR_API_KEY, actor_id),
                outcome="success" if decision in ("allowed", "replayed") else "denied",
                tenant_id=grant.tenant_id if grant is not None else None,
                target=f"{method} {endpoint.template}",
                request_id=request_id or None,
                details={"scope": endpoint.scope, "status": status, "decision": decision,
                         "latency_ms": round((time.perf_counter() - started) * 1000, 1)},
            )
        )
