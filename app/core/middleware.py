"""The one pure-ASGI middleware every request passes: request id, access log, security headers,
the edge's input rules (``input_rules``: Host, characters, duplicate JSON keys) and body size.

Pure ASGI (no ``BaseHTTPMiddleware``) so the proxy's hot path pays almost nothing for it. It
also turns an exception that escaped every handler into our own 500 page, so even that answer
carries the request id and the security headers and never a stack trace.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Any

import structlog
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import Refusal, render_error
from app.core.input_rules import check_body, check_host, check_media, check_url, checks_body
from app.core.logs import get_logger
from app.core.metrics import REQUEST_SECONDS, REQUESTS
from app.kit.asgi import BodyTooLarge, buffer_body

log = get_logger("app.access")
_ACCESS_LOG = logging.getLogger("app.access")

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_TOO_LARGE = Refusal(413, "payload_too_large", "The request body is too large.")
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; form-action 'self' {authorize_origin}; "
    "frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)


def _security_headers(*, https: bool, authorize_origin: str) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"content-security-policy", CSP.format(authorize_origin=authorize_origin).encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
        (b"x-frame-options", b"DENY"),
        (b"cross-origin-opener-policy", b"same-origin"),
        (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
    ]
    if https:
        headers.append((b"strict-transport-security", b"max-age=63072000; includeSubDomains"))
    return headers


class RequestContextMiddleware:
    """Request id (kept from ``X-Request-ID`` when it is safe), access log, security headers."""

    def __init__(self, app: ASGIApp, *, https: bool, authorize_origin: str, on_error: Any, max_body: int = 1024 * 1024) -> None:
        self.app = app
        self.headers = _security_headers(https=https, authorize_origin=authorize_origin)
        self.on_error = on_error
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = headers.get("x-request-id", "")
        if not _SAFE_REQUEST_ID.fullmatch(request_id):
            request_id = secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = request_id
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 0
        extra = [*self.headers, (b"x-request-id", request_id.encode())]
        response_started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [
                    *message.get("headers", []),
                    *(h for h in extra if h[0] not in present),
                ]
            await send(message)

        proxied = _is_proxy(scope["path"])
        refusal = None
        if not proxied:  # the proxy applies the same rules itself, and has its own, larger body limit
            refusal = check_host(scope) or check_url(scope)
            if refusal is None:
                refusal, receive = await self._check_body(scope, headers, receive)
        if refusal is not None:
            response = render_error(Request(scope), status_code=refusal.status_code, code=refusal.code,
                                    message=refusal.message)
            await response(scope, receive, send_wrapper)
            self._log(scope, refusal.status_code, started)
            return
        try:
            if proxied:  # the hot path skips the router and FastAPI's exception and exit-stack layers
                await scope["app"].state.runtime.proxy.handle(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        except Exception as exc:  # noqa: BLE001 - last line of defence, logged in on_error
            if response_started:
                raise
            response = await self.on_error(Request(scope), exc)
            await response(scope, receive, send_wrapper)
        finally:
            self._log(scope, status, started, proxied=proxied)

    async def _check_body(self, scope: Scope, headers: Headers, receive: Receive) -> tuple[Refusal | None, Receive]:
        """The size limit, and ``input_rules`` on a form or JSON body (read now, replayed to the app)."""
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            return _TOO_LARGE, receive
        if scope["method"] not in _BODY_METHODS:
            return None, receive
        content_type = headers.get("content-type")
        refusal = check_media(content_type)
        if refusal is not None or (declared is not None and not checks_body(content_type)):
            return refusal, receive
        try:  # chunked, or a body to check: read it now, up to the limit
            body, receive = await buffer_body(receive, limit=self.max_body)
        except BodyTooLarge:
            return _TOO_LARGE, receive
        return (check_body(content_type, body) if body is not None else None), receive

    @staticmethod
    def _log(scope: Scope, status: int, started: float, *, proxied: bool = False) -> None:
        elapsed = time.perf_counter() - started
        if not proxied:  # the proxy counts itself
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in _METHODS else "OTHER"
            REQUESTS.labels(template, method, str(status)).inc()
            REQUEST_SECONDS.labels(template).observe(elapsed)
        if _ACCESS_LOG.isEnabledFor(logging.INFO):  # skip building the event when it would be dropped
            log.info("request", method=scope["method"], path=scope["path"], status=status, ms=round(elapsed * 1000, 2))


_PROXY_PATH = re.compile(r"/api/v1/tenants/[^/]+/proxy/")  # app.proxy.handler.ROUTE; the rest of the path is the proxy's


def _is_proxy(path: str) -> bool:
    return _PROXY_PATH.match(path) is not None
