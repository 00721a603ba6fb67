"""The REST proxy: ``/api/v1/tenants/{tenant}/proxy/{path}`` to ``SMC_SALESMSG_API_BASE/{path}``.

The hot path (DESIGN.md, "The proxy's hot path"): a plain ASGI handler, called by our outermost
middleware before FastAPI's router (app/middleware.py), one database round trip
per request (key, tenant, BAA state, connection and wrapped data key in one query, so a revoked
key or BAA, a disconnect or a refresh elsewhere takes effect on the next request in every
process), the pooled aiohttp session upstream, bodies relayed as bytes.

Rules, in order, before anything reaches Salesmsg: a well-formed key in the Authorization header
(never the query string); a safe path under the API base; a known endpoint (fail closed); the
rate limits; the key covers the tenant and may write if the method writes; the connection is
active; the endpoint's scope is granted; a PHI scope on a HIPAA tenant needs a signed BAA.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn
from urllib.parse import unquote

import asyncpg
from sqlalchemy import and_, bindparam, exists, select
from sqlalchemy.exc import OperationalError
from starlette.types import Receive, Scope, Send

from app.audit.audit_log import ACTOR_API_KEY, Actor, AuditRecord
from app.audit.writer import AuditWriter
from app.connections import scopes
from app.core.db import Database
from app.core.errors import UNAVAILABLE_SQLSTATES, AppError
from app.core.logs import get_logger
from app.core.metrics import PROXY_DENIALS, REQUEST_SECONDS, REQUESTS, child
from app.core.models import ApiKey, ApiKeyTenant, Connection, Tenant, TenantKey
from app.core.settings import Settings
from app.identity import api_keys
from app.identity.key_usage import UsageRecorder
from app.proxy.endpoint_scopes import READ_METHODS, Endpoint, resolve
from app.proxy.idempotency import (
    Idempotency,
    IdempotencyError,
    Stored,
    fingerprint,
    valid_key,
)
from app.proxy.rate_limits import RateLimits
from app.proxy.upstream import Access, Answer, Refusal, Upstream, decide, error_json
from app.tenants.registry import SLUG
from app.vault.envelope import DataKey, DataKeyCache, VaultError

log = get_logger(__name__)

PREFIX = "/api/v1/tenants/"
ROUTE = "/api/v1/tenants/{tenant}/proxy/{path}"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
SAFE_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
SAFE_QUERY = re.compile(rb"[\x21-\x7e]*")
FORWARD_REQUEST_HEADERS = frozenset({b"content-type", b"accept", b"accept-language", b"if-none-match", b"if-modified-since"})
QUERY_KEY_NAMES = re.compile(rb"(?:^|&)(api_key|apikey|key|access_token|token)=", re.IGNORECASE)
_PARAM_PREFIX = bindparam("prefix")
_PARAM_SLUG = bindparam("slug")
_PARAM_ID = bindparam("tenant_id")


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
    segments = decoded.split("/")
    for segment in segments:
        if segment in ("", ".", "..") or not SAFE_SEGMENT.fullmatch(segment):
            raise Refusal(400, "invalid_path", "The path may hold only letters, digits, '-', '_' and '.' between single slashes.")
    return decoded


@dataclass(slots=True)
class Grant:
    """What the single lookup query returns."""

    key_id: uuid.UUID
    key_hash: str
    all_tenants: bool
    read_only: bool
    revoked_at: datetime | None
    last_used_at: datetime | None
    tenant_id: uuid.UUID | None
    slug: str | None
    hipaa: bool | None
    baa_signed_at: datetime | None
    covered: bool
    conn_id: uuid.UUID | None
    kind: str | None
    status: str | None
    scopes: str | None
    version: int | None
    access_token_ct: bytes | None
    access_expires_at: datetime | None
    data_key_id: uuid.UUID | None
    master_key_id: str | None
    wrapped_key: bytes | None

    def access(self) -> Access:
        return Access(self.tenant_id, bool(self.hipaa), self.baa_signed_at, self.conn_id, self.kind,  # type: ignore[arg-type]
                      self.status, self.scopes, self.version, self.access_token_ct, self.access_expires_at)


def _lookup_statement(by_id: bool):
    tenant_match = Tenant.id == _PARAM_ID if by_id else Tenant.slug == _PARAM_SLUG
    covered = exists().where(and_(ApiKeyTenant.api_key_id == ApiKey.id, ApiKeyTenant.tenant_id == Tenant.id))
    return (
        select(
            ApiKey.id, ApiKey.key_hash, ApiKey.all_tenants, ApiKey.read_only, ApiKey.revoked_at, ApiKey.last_used_at,
            Tenant.id, Tenant.slug, Tenant.hipaa, Tenant.baa_signed_at, covered.label("covered"),
            Connection.id, Connection.kind, Connection.status, Connection.scopes, Connection.version,
            Connection.access_token_ct, Connection.access_expires_at,
            TenantKey.id, TenantKey.master_key_id, TenantKey.wrapped_key,
        )
        .select_from(ApiKey)
        .outerjoin(Tenant, tenant_match)
        .outerjoin(Connection, Connection.tenant_id == Tenant.id)
        .outerjoin(TenantKey, TenantKey.tenant_id == Tenant.id)
        .where(ApiKey.prefix == _PARAM_PREFIX)
    )


class Proxy:
    """The per-process proxy service; ``handle`` is the ASGI entry point."""

    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        upstream: Upstream,
        idempotency: Idempotency,
        data_keys: DataKeyCache,
        audit_writer: AuditWriter,
        usage: UsageRecorder,
        rate_limits: RateLimits,
    ) -> None:
        self.settings = settings
        self.db = db
        self.upstream = upstream
        self.data_keys = data_keys
        self.audit = audit_writer
        self.usage = usage
        self.rate_limits = rate_limits
        self.idempotency = idempotency
        self.by_slug = _lookup_statement(by_id=False)
        self.by_id = _lookup_statement(by_id=True)
        # PostgreSQL: the same query as SQL text for asyncpg itself, on a connection checked out
        # of SQLAlchemy's pool: one round trip (a prepared statement asyncpg caches per
        # connection), where SQLAlchemy's autobegin would add BEGIN and ROLLBACK around it.
        self.raw_sql: dict[bool, tuple[str, tuple[str, ...]]] | None = None
        if db.is_postgres:
            self.raw_sql = {}
            for by_id, statement in ((False, self.by_slug), (True, self.by_id)):
                compiled = statement.compile(dialect=db.engine.dialect)
                self.raw_sql[by_id] = (str(compiled), tuple(compiled.positiontup or ()))

    # -- ASGI ---------------------------------------------------------------------------------

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        method = scope["method"]
        state = scope.setdefault("state", {})
        request_id = state.get("request_id", "")
        context: dict[str, Any] = {"endpoint": None, "grant": None, "prefix": None}
        try:
            status, headers, body = await self._serve(scope, receive, method, request_id, context)
        except AppError as exc:  # our refusals, and the refresh engine's 409 needs_reauth / 503
            PROXY_DENIALS.labels(exc.code).inc()
            status, body = exc.status_code, error_json(exc.code, exc.message)
            headers = [(b"content-type", b"application/json"), *((k.lower().encode(), v.encode()) for k, v in exc.headers.items())]
            self._audit(context, method, request_id, status, started, decision=exc.code)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
        elapsed = time.perf_counter() - started
        child(REQUESTS, ROUTE, method, str(status)).inc()
        child(REQUEST_SECONDS, ROUTE).observe(elapsed)

    async def _serve(
        self, scope: Scope, receive: Receive, method: str, request_id: str, context: dict[str, Any]
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        started = time.perf_counter()
        if method not in METHODS:
            raise Refusal(405, "method_not_allowed", "That method is not proxied.")
        query: bytes = scope.get("query_string", b"")
        if QUERY_KEY_NAMES.search(query):
            raise Refusal(400, "api_key_in_query", "Send the API key in the Authorization header, never in the URL.")
        if len(query) > 4096 or not SAFE_QUERY.fullmatch(query):
            raise Refusal(400, "invalid_query", "The query string is too long or holds invalid characters.")
        tenant_ref, raw_tail = self._split(scope)
        presented = self._bearer(scope)
        prefix = api_keys.parse(presented) if presented else None
        context["prefix"] = prefix
        path = safe_path(raw_tail)
        endpoint = resolve(method, path)
        if endpoint is None:
            raise Refusal(404, "unknown_endpoint", "This Salesmsg endpoint is not one the proxy knows; it is refused.")
        context["endpoint"] = endpoint
        if presented is None:
            raise Refusal(401, "missing_api_key", "Send 'Authorization: Bearer <api key>'.", {"WWW-Authenticate": "Bearer"})
        if prefix is None:
            raise Refusal(401, "invalid_api_key", "The API key is not valid.", {"WWW-Authenticate": "Bearer"})
        grant = await self._lookup(prefix, tenant_ref)
        if grant is None or grant.revoked_at is not None or not api_keys.matches(grant.key_hash, presented):
            context["prefix"] = None if grant is None else prefix
            raise Refusal(401, "invalid_api_key", "The API key is not valid.", {"WWW-Authenticate": "Bearer"})
        context["grant"] = grant
        self.usage.touch(grant.key_id, grant.last_used_at)
        if grant.tenant_id is None or not (grant.all_tenants or grant.covered):
            raise Refusal(404, "tenant_not_found", "No such tenant for this key.")
        wait = await self.rate_limits.check(key_id=grant.key_id, tenant_id=grant.tenant_id)
        if wait is not None:
            raise Refusal(429, "rate_limited", "Too many requests for this key or tenant.", {"Retry-After": str(wait)})
        if grant.read_only and method not in READ_METHODS:
            raise Refusal(403, "read_only_key", "This API key is read-only.")
        access = grant.access()
        decide(access, endpoint)
        if self.audit.full and scopes.is_phi(endpoint.scope):
            raise Refusal(503, "audit_unavailable", "PHI access cannot be audited right now; try again shortly.",
                          {"Retry-After": "5"})
        body = await self._body(scope, receive)
        key = self._data_key(grant)
        idem_key = self._header(scope, b"idempotency-key")
        if idem_key is not None and method == "POST":
            return await self._idempotent(scope, method, path, query, body, access, key, idem_key, request_id, context, started)
        answer = await self._forward(scope, method, path, query, body, access, key, request_id)
        self._audit(context, method, request_id, answer.status, started, decision="allowed")
        return answer.status, answer.headers, answer.body

    # -- pieces -------------------------------------------------------------------------------

    def _split(self, scope: Scope) -> tuple[str, bytes]:
        raw = scope.get("raw_path") or scope["path"].encode()
        raw = raw.split(b"?", 1)[0]
        rest = raw[len(PREFIX):]
        tenant, sep, tail = rest.partition(b"/proxy/")
        if not sep or not tenant or b"/" in tenant:
            raise Refusal(404, "not_found", "Nothing was found here.")
        try:
            return unquote(tenant.decode("ascii")), tail
        except UnicodeDecodeError:
            raise Refusal(404, "tenant_not_found", "No such tenant for this key.") from None

    @staticmethod
    def _header(scope: Scope, name: bytes) -> str | None:
        for key, value in scope["headers"]:
            if key == name:
                return value.decode("latin-1")
        return None

    def _bearer(self, scope: Scope) -> str | None:
        value = self._header(scope, b"authorization")
        if value is None:
            return None
        kind, _, token = value.partition(" ")
        return token.strip() if kind.lower() == "bearer" and token.strip() else ""

    async def _lookup(self, prefix: str, tenant_ref: str) -> Grant | None:
        try:
            tenant_id = uuid.UUID(tenant_ref)
        except ValueError:
            tenant_id = None
        by_id = tenant_id is not None
        slug = tenant_ref.lower()
        if not by_id and not SLUG.fullmatch(slug):
            slug = ""  # matches no tenant (the key is still checked first); a NUL never reaches PostgreSQL
        params = {"prefix": prefix, "tenant_id": tenant_id} if by_id else {"prefix": prefix, "slug": slug}
        async with self.db.engine.connect() as conn:
            if self.raw_sql is None:
                row = (await conn.execute(self.by_id if by_id else self.by_slug, params)).first()
            else:
                sql, names = self.raw_sql[by_id]
                raw = (await conn.get_raw_connection()).driver_connection
                try:
                    row = await raw.fetchrow(sql, *(params[name] for name in names))
                except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                    await self._disconnected(conn, exc)
                except asyncpg.PostgresError as exc:
                    if str(exc.sqlstate or "").startswith(UNAVAILABLE_SQLSTATES):
                        await self._disconnected(conn, exc)
                    raise
        return Grant(*row) if row is not None else None

    async def _disconnected(self, conn, exc: Exception) -> NoReturn:
        """What SQLAlchemy does on a disconnect: every connection pooled before now is stale
        (PostgreSQL restarted), this one is dropped, and the caller gets the documented 503."""
        fairy = await conn.get_raw_connection()
        self.db.engine.sync_engine.pool._invalidate(fairy, exc, _checkin=False)  # pinned SQLAlchemy 2.1
        await conn.invalidate(exc)
        raise OperationalError("proxy grant lookup", None, exc, connection_invalidated=True) from exc

    def _data_key(self, grant: Grant) -> DataKey:
        if grant.data_key_id is None or grant.master_key_id is None or grant.wrapped_key is None:
            raise Refusal(409, "not_connected", "The tenant's keys were shredded; connect again.")
        try:
            return self.data_keys.get(key_id=grant.data_key_id, tenant_id=grant.tenant_id, master_key_id=grant.master_key_id,
                                      wrapped=grant.wrapped_key)  # type: ignore[arg-type]
        except VaultError:
            log.error("data key does not open", tenant_id=str(grant.tenant_id))
            raise Refusal(503, "vault_unavailable", "The tenant's token cannot be opened; an operator must check the keys.") from None

    async def _body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.settings.proxy_max_body_bytes
        declared = self._header(scope, b"content-length")
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
        self, scope: Scope, method: str, path: str, query: bytes, body: bytes, access: Access, key: DataKey, request_id: str
    ) -> Answer:
        """Only the caller's content headers go upstream: its Authorization, Cookie, Host,
        X-Forwarded-*, hop-by-hop and every other header stay here."""
        headers = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in FORWARD_REQUEST_HEADERS
        }
        return await self.upstream.call(access, key, method=method, path=path, query=query, body=body, headers=headers,
                                        request_id=request_id)

    async def _idempotent(
        self, scope: Scope, method: str, path: str, query: bytes, body: bytes, access: Access, key: DataKey,
        idem_key: str, request_id: str, context: dict[str, Any], started: float,
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        if not valid_key(idem_key):
            raise Refusal(400, "invalid_idempotency_key", "An Idempotency-Key is 1-255 printable ASCII characters.")
        fp = fingerprint(method, path, query, body)
        try:
            stored = await self.idempotency.begin(tenant_id=access.tenant_id, key=idem_key, fp=fp, data_key=key)
        except IdempotencyError as exc:
            raise Refusal(exc.status, exc.code, exc.message) from None
        if stored is not None:
            self._audit(context, method, request_id, stored.status, started, decision="replayed")
            return stored.status, _stored_headers(stored), stored.body
        answer = await self.idempotency.run(
            tenant_id=access.tenant_id, key=idem_key, data_key=key,
            call=lambda: self._forward(scope, method, path, query, body, access, key, request_id),
        )
        self._audit(context, method, request_id, answer.status, started, decision="allowed")
        return answer.status, answer.headers, answer.body

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


def _json_headers() -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json")]


def _stored_headers(stored: Stored) -> list[tuple[bytes, bytes]]:
    headers = [(b"idempotent-replayed", b"true")]
    if stored.content_type:
        headers.append((b"content-type", stored.content_type.encode()))
    return headers

