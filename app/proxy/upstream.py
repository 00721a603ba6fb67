"""Calling Salesmsg for a tenant once the gate (``connections.policy.decide``) let the call go.

Every caller (the proxy, the dashboard) uses it. ``Upstream.call`` sends the request with a
fresh token: idempotent methods are retried with jittered backoff honouring ``Retry-After``,
redirects are not followed, and the answer comes back as bytes.

Every attempt first takes its place in Salesmsg's request budget (``budget``): it may wait there
briefly, or be refused with our 429. A 429 from Salesmsg is never retried: it locks the budget for
every process (Salesmsg refuses the org for 60 s and says nothing; a ``Retry-After`` from something
in front of it sets the lockout instead) and is relayed with ``Retry-After``.

Salesmsg refusing a token we believed valid (``token_trouble``) forces one refresh per call, never
a loop. It says so in three ways: 401; 403 whose JSON ``message`` starts "Could not decode token"
or is "Unauthenticated(.)" (a 403 for a scope or a BAA is not one); and, on some endpoints
(``/teams``), 500 ``{"message": null}``. A 401 or such a 403 proves the call was not accepted, so
it is retried once whatever the method. The 500 could also be a real server error, so it counts
only while the token was not already refreshed during this call; it forces the refresh, and an
idempotent method is retried once, but a POST or PATCH is not: a send is never blindly retried,
the 500 is relayed and the next call carries the new token.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import aiohttp

from app.connections.refresh import Refresher
from app.connections.view import ConnectionView
from app.core.errors import error_json
from app.core.logs import get_logger
from app.core.metrics import UPSTREAM_SECONDS, UPSTREAM_STATUS, child
from app.core.settings import Settings
from app.kit.backoff import jittered
from app.kit.retry_after import retry_after_seconds
from app.proxy.budget import UpstreamBudget
from app.vault.envelope import DataKey

log = get_logger(__name__)

IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE"})
# True once this task has started sending a request to Salesmsg (read by ``idempotency`` when a
# call is cancelled: cancelled while it waited for the budget, nothing was sent)
SENDING: ContextVar[bool] = ContextVar("smc_upstream_sending", default=False)
REFUSED, SERVER_ERROR = "refused", "server_error"  # kinds of token trouble
_TOKEN_MESSAGES = frozenset({"Unauthenticated", "Unauthenticated."})
RETRY_STATUSES = frozenset({502, 503, 504})
RELAY_RESPONSE_HEADERS = frozenset(
    {"content-type", "content-encoding", "retry-after", "etag", "last-modified", "cache-control", "content-language"}
)


@dataclass(slots=True)
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    reached: bool  # False when Salesmsg never got the request (connection refused)
    upstream_status: int | None = None  # Salesmsg's own status; None when the answer is ours (a timeout) or replayed

    @property
    def content_type(self) -> str | None:
        return next((v.decode("latin-1") for k, v in self.headers if k == b"content-type"), None)


_JSON = [(b"content-type", b"application/json")]


def _json_message(payload: bytes) -> tuple[bool, object]:
    """Whether the body is a small JSON object with a ``message``, and that message."""
    if not payload or len(payload) > 4096:
        return False, None
    try:
        parsed = json.loads(payload)
    except ValueError:
        return False, None
    if not isinstance(parsed, dict) or "message" not in parsed:
        return False, None
    return True, parsed["message"]


def token_trouble(status: int, payload: bytes) -> str | None:
    """Whether Salesmsg's answer says it did not accept the token: ``REFUSED`` (401, or a 403
    about the token), ``SERVER_ERROR`` (500 ``{"message": null}``), or None."""
    if status == 401:
        return REFUSED
    if status == 403:
        found, message = _json_message(payload)
        if found and isinstance(message, str) and (
            message.startswith("Could not decode token") or message in _TOKEN_MESSAGES
        ):
            return REFUSED
    elif status == 500:
        found, message = _json_message(payload)
        if found and message is None:
            return SERVER_ERROR
    return None


class Upstream:
    def __init__(self, *, settings: Settings, http: aiohttp.ClientSession, refresher: Refresher,
                 budget: UpstreamBudget) -> None:
        self.settings = settings
        self.http = http
        self.refresher = refresher
        self.budget = budget
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
        caller: str,
    ) -> Answer:
        """Send one request to ``{API base}/{path}`` with the tenant's token, retrying what is safe.
        ``caller`` (an API key, a dashboard user) is whom the budget's queue is fair between."""
        token = await self.refresher.access_token(conn, key=key)
        refreshed = token.version != conn.version  # already refreshed during this call
        url = f"{self.base}/{path}" + (f"?{query.decode('ascii')}" if query else "")
        send_headers: dict[str, Any] = dict(headers or {})
        if request_id:
            send_headers["X-Request-ID"] = request_id
        attempt, forced, reached = 0, False, False
        retries = self.settings.proxy_max_retries if method in IDEMPOTENT else 0
        while True:
            await self.budget.acquire(conn, caller=caller)
            SENDING.set(True)
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
            trouble = token_trouble(status, payload) if status in (401, 403, 500) and not forced else None
            if trouble == REFUSED or (trouble == SERVER_ERROR and not refreshed):
                forced = refreshed = True  # Salesmsg refused a token we believed valid: refresh once
                if trouble == REFUSED or method in IDEMPOTENT:
                    token = await self.refresher.force_refresh(conn.id, seen_version=token.version)
                    continue  # ... and retry once
                try:  # a POST/PATCH answered 500: the new token is for the next call, this one is relayed
                    await self.refresher.force_refresh(conn.id, seen_version=token.version)
                except Exception:  # noqa: BLE001 - whatever failed, the send may have gone: Salesmsg's answer stands
                    log.warning("refresh after a 500 on a write failed; the next call retries it", method=method)
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
            if status == 429:
                hinted = retry_after_seconds(upstream_headers.get("Retry-After"))
                lockout = self.budget.lockout_for(hinted)
                await self.budget.locked_out(conn, seconds=lockout)
                if lockout != hinted:  # Salesmsg sends no header (or something sent 0): say how long it is
                    relayed = [h for h in relayed if h[0] != b"retry-after"]
                    relayed.append((b"retry-after", str(math.ceil(lockout)).encode()))
            return Answer(status, relayed, payload, True, status)
