"""Calling Salesmsg for a tenant, with the rules every caller (the proxy, the dashboard) obeys.

``decide`` is the gate: the connection is active, the endpoint's scope is granted, and a PHI
scope on a HIPAA tenant (OAuth connection) needs a signed BAA, read from the database's current
row. ``Upstream.call`` sends the request with a fresh token: idempotent methods are retried
with jittered backoff honouring ``Retry-After``, a 401 on a token we believed valid forces one
refresh and one retry, redirects are not followed, and the answer comes back as bytes.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp

from app.connections import scopes
from app.connections.refresh import Refresher, Snapshot
from app.core.errors import BAA_REQUIRED_MESSAGE, AppError
from app.core.metrics import UPSTREAM_SECONDS, UPSTREAM_STATUS, child
from app.core.models import Connection, Tenant
from app.core.settings import Settings
from app.kit.retry_after import retry_after_seconds
from app.proxy.endpoint_scopes import Endpoint
from app.vault.envelope import DataKey

IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE"})
RETRY_STATUSES = frozenset({429, 502, 503, 504})
RELAY_RESPONSE_HEADERS = frozenset(
    {"content-type", "content-encoding", "retry-after", "etag", "last-modified", "cache-control", "content-language"}
)


class Refusal(AppError):
    """A call refused before it reaches Salesmsg."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, code=code, status_code=status, headers=headers)

    @property
    def status(self) -> int:
        return self.status_code


@dataclass(slots=True)
class Access:
    """A tenant's BAA state and connection, as read from the database for this request."""

    tenant_id: uuid.UUID
    hipaa: bool
    baa_signed_at: datetime | None
    conn_id: uuid.UUID | None
    kind: str | None
    status: str | None
    scopes: str | None
    version: int | None
    access_token_ct: bytes | None
    access_expires_at: datetime | None

    @classmethod
    def of(cls, tenant: Tenant, conn: Connection | None) -> "Access":
        return cls(
            tenant.id, tenant.hipaa, tenant.baa_signed_at,
            conn.id if conn else None, conn.kind if conn else None, conn.status if conn else None,
            conn.scopes if conn else None, conn.version if conn else None,
            conn.access_token_ct if conn else None, conn.access_expires_at if conn else None,
        )

    def snapshot(self) -> Snapshot:
        return Snapshot(self.conn_id, self.tenant_id, self.kind or "oauth", self.status or "disconnected",  # type: ignore[arg-type]
                        self.version or 0, self.access_token_ct, self.access_expires_at)

    @property
    def phi_blocked(self) -> bool:
        return self.kind == "oauth" and self.hipaa and self.baa_signed_at is None


_SCOPE_SETS: dict[str, frozenset[str]] = {}


def granted(raw: str | None) -> frozenset[str]:
    raw = raw or ""
    found = _SCOPE_SETS.get(raw)
    if found is None:
        found = frozenset(raw.split())
        if len(_SCOPE_SETS) < 10_000:
            _SCOPE_SETS[raw] = found
    return found


def decide(access: Access, endpoint: Endpoint) -> None:
    """Raise the refusal for this call, or return when it may go to Salesmsg."""
    if access.conn_id is None or access.status == "disconnected" or access.access_token_ct is None:
        raise Refusal(409, "not_connected", "The tenant has no active Salesmsg connection.")
    if access.status == "needs_reauth":
        raise Refusal(409, "connection_needs_reauth", "The tenant's Salesmsg connection must be reconnected.")
    if endpoint.scope not in granted(access.scopes):
        raise Refusal(403, "insufficient_scope", f"The connection was not granted {endpoint.scope}.")
    if access.phi_blocked and scopes.is_phi(endpoint.scope):
        raise Refusal(403, "baa_required", BAA_REQUIRED_MESSAGE)


@dataclass(slots=True)
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    reached: bool  # False when Salesmsg never got the request (connection refused)

    @property
    def content_type(self) -> str | None:
        return next((v.decode("latin-1") for k, v in self.headers if k == b"content-type"), None)


def error_json(code: str, message: str) -> bytes:
    import json

    return json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode()


_JSON = [(b"content-type", b"application/json")]


class Upstream:
    def __init__(self, *, settings: Settings, http: aiohttp.ClientSession, refresher: Refresher) -> None:
        self.settings = settings
        self.http = http
        self.refresher = refresher
        self.base = settings.salesmsg_api_base
        self.timeout = aiohttp.ClientTimeout(
            total=settings.salesmsg_timeout_seconds, sock_connect=settings.salesmsg_connect_timeout_seconds
        )

    def _backoff(self, attempt: int) -> float:
        base = self.settings.proxy_retry_base_seconds * 2 ** (attempt - 1)
        return random.uniform(base / 2, base)

    async def call(
        self,
        access: Access,
        key: DataKey | None,
        *,
        method: str,
        path: str,
        query: bytes = b"",
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        request_id: str = "",
    ) -> Answer:
        """Send one request to ``{API base}/{path}`` with the tenant's token, retrying what is safe."""
        token = await self.refresher.access_token(access.snapshot(), key=key)
        url = f"{self.base}/{path}" + (f"?{query.decode('ascii')}" if query else "")
        send_headers: dict[str, Any] = dict(headers or {})
        if request_id:
            send_headers["X-Request-ID"] = request_id
        attempt, forced, reached = 0, False, False
        retries = self.settings.proxy_max_retries if method in IDEMPOTENT else 0
        while True:
            send_headers["Authorization"] = f"Bearer {token.value}"
            started = time.perf_counter()
            try:
                async with self.http.request(
                    method, url, data=body or None, headers=send_headers, allow_redirects=False,
                    timeout=self.timeout, skip_auto_headers=("Accept-Encoding",),
                ) as resp:
                    payload = await resp.read()
                    status, upstream_headers = resp.status, resp.headers
                reached = True
            except asyncio.TimeoutError:
                child(UPSTREAM_SECONDS, method).observe(time.perf_counter() - started)
                if attempt < retries:
                    attempt += 1
                    await asyncio.sleep(self._backoff(attempt))
                    continue
                return Answer(504, list(_JSON), error_json("upstream_timeout", "Salesmsg did not answer in time."), True)
            except aiohttp.ClientError as exc:
                child(UPSTREAM_SECONDS, method).observe(time.perf_counter() - started)
                if attempt < retries:
                    attempt += 1
                    await asyncio.sleep(self._backoff(attempt))
                    continue
                never_sent = isinstance(exc, aiohttp.ClientConnectorError)
                body_ = error_json("upstream_unavailable", "Salesmsg could not be reached.")
                return Answer(502, list(_JSON), body_, reached or not never_sent)
            child(UPSTREAM_SECONDS, method).observe(time.perf_counter() - started)
            child(UPSTREAM_STATUS, str(status)).inc()
            if status == 401 and not forced and access.conn_id is not None:
                forced = True  # Salesmsg refused a token we believed valid: refresh once, retry once
                token = await self.refresher.force_refresh(access.conn_id, seen_version=token.version)
                continue
            if status in RETRY_STATUSES and attempt < retries:
                delay = retry_after_seconds(upstream_headers.get("Retry-After"))
                if delay is None:
                    delay = self._backoff(attempt + 1)
                if delay <= self.settings.proxy_retry_after_cap_seconds:
                    attempt += 1
                    await asyncio.sleep(delay)
                    continue
            relayed = [(k.lower().encode(), v.encode("latin-1")) for k, v in upstream_headers.items()
                       if k.lower() in RELAY_RESPONSE_HEADERS]
            if status == 429 and "Retry-After" not in upstream_headers:
                relayed.append((b"retry-after", b"60"))  # Salesmsg locks out for 60 s and sends no header
            return Answer(status, relayed, payload, True)
