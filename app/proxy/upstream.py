"""Calling Salesmsg for a tenant once the gate (``connections.policy.decide``) let the call go.

Every caller (the proxy, the dashboard) uses it. ``Upstream.call`` sends the request with a
fresh token: idempotent methods are retried
with jittered backoff honouring ``Retry-After``, a 401 on a token we believed valid forces one
refresh and one retry, redirects are not followed, and the answer comes back as bytes.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from app.connections.refresh import Refresher
from app.connections.view import ConnectionView
from app.core.errors import error_json
from app.core.metrics import UPSTREAM_SECONDS, UPSTREAM_STATUS, child
from app.core.settings import Settings
from app.kit.backoff import jittered
from app.kit.retry_after import retry_after_seconds
from app.vault.envelope import DataKey

IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE"})
RETRY_STATUSES = frozenset({429, 502, 503, 504})
RELAY_RESPONSE_HEADERS = frozenset(
    {"content-type", "content-encoding", "retry-after", "etag", "last-modified", "cache-control", "content-language"}
)


@dataclass(slots=True)
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    reached: bool  # False when Salesmsg never got the request (connection refused)

    @property
    def content_type(self) -> str | None:
        return next((v.decode("latin-1") for k, v in self.headers if k == b"content-type"), None)


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
        return jittered(attempt, base=self.settings.proxy_retry_base_seconds, cap=math.inf)

    async def call(
        self,
        conn: ConnectionView,
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
        token = await self.refresher.access_token(conn, key=key)
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
            if status == 401 and not forced:
                forced = True  # Salesmsg refused a token we believed valid: refresh once, retry once
                token = await self.refresher.force_refresh(conn.id, seen_version=token.version)
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
