"""The ASGI middleware around every request: counters, faults, delays, persistence.

For each request outside ``/_emulator`` it counts the endpoint (see the
README for the counter names), applies the configured latency or token
delay, then a pending drop or fail fault, and otherwise runs the app and
counts the answer's status. After every request (controls included) it
saves a snapshot when the store changed and ``persist_path`` is set.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from http import HTTPStatus
from urllib.parse import parse_qs

from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from salesmsg_emulator.api.guard import API_PREFIX, error_page
from salesmsg_emulator.faults import FailRule
from salesmsg_emulator.oauth import PAT_REFRESH_PATH, REFRESH_PATH, TOKEN_PATH
from salesmsg_emulator.request_body import parse_json, read_ahead
from salesmsg_emulator.runtime import Emulator

# "{id:int}" in a route path is counted as "{id}"
_CONVERTER = re.compile(r":[a-z]+}")

TOKEN_PATHS = (TOKEN_PATH, REFRESH_PATH, PAT_REFRESH_PATH)
_MULTIPART_GRANT = re.compile(rb'name="grant_type"\r\n\r\n([a-z_]+)')


class ConnectionDropped(Exception):
    """Raised for a drop fault when the server gives no way to close the socket (not uvicorn)."""


def is_api_path(path: str) -> bool:
    return path.startswith(API_PREFIX + "/") and not path.startswith(API_PREFIX + "/oauth/")


async def drop_connection(receive: Receive) -> None:
    """Close the client's connection without any HTTP answer.

    Uvicorn hands the app ``receive`` as a bound method of its request cycle,
    which holds the connection's transport: closing it is what a crashed or
    overloaded upstream looks like to the client (``RemoteProtocolError`` in
    httpx). Then wait for uvicorn to notice, so it does not answer a 500.
    """
    transport = getattr(getattr(receive, "__self__", None), "transport", None)
    if transport is None or not hasattr(transport, "close"):
        raise ConnectionDropped("connection dropped by the emulator's drop fault")
    transport.close()
    try:
        async with asyncio.timeout(2):
            while (await receive())["type"] != "http.disconnect":
                pass
    except TimeoutError:
        pass


def _grant_type(body: bytes, content_type: str) -> str | None:
    try:
        if "json" in content_type:
            value = parse_json(body or b"{}").get("grant_type")
            return value if isinstance(value, str) else None
        if "multipart" in content_type:
            match = _MULTIPART_GRANT.search(body)
            return match.group(1).decode() if match else None
        return parse_qs(body.decode("utf-8", "replace")).get("grant_type", [None])[0]
    except (ValueError, AttributeError):
        return None


class EmulatorMiddleware:
    def __init__(self, app: ASGIApp, *, emulator: Emulator, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.emulator = emulator
        self.routes = routes

    def _api_template(self, scope: Scope) -> str:
        partial = None
        for route in self.routes:
            match, _ = route.matches(scope)
            path = getattr(route, "path", "")
            if match is Match.FULL:
                return _CONVERTER.sub("}", path[len(API_PREFIX) :])
            if match is Match.PARTIAL and partial is None:
                partial = _CONVERTER.sub("}", path[len(API_PREFIX) :])
        return partial or "(unmatched)"

    async def _classify(self, scope: Scope, receive: Receive) -> tuple[list[str], Receive]:
        """Counter names for the request; may buffer the body (token endpoint) and return a replaying receive."""
        method, path = scope["method"], scope["path"]
        if path == TOKEN_PATH and method == "POST":
            body, replay = await read_ahead(receive)
            if body is None:
                return ["token.unknown"], replay
            headers = dict(scope["headers"])
            grant = _grant_type(body, headers.get(b"content-type", b"").decode("latin-1").lower())
            name = {"authorization_code": "authorization_code", "refresh_token": "refresh"}.get(grant or "", "unknown")
            names = [f"token.{name}"] + (["token.refresh./oauth/token"] if name == "refresh" else [])
            return names, replay
        if path in (REFRESH_PATH, PAT_REFRESH_PATH):
            # read now: like Salesmsg, a refresh whose body arrived is carried out (and rotates)
            # even if the client hangs up during the token delay
            names = ["token.refresh", "token.refresh./oauth/token/refresh"] if path == REFRESH_PATH else ["token.pat_refresh"]
            return names, (await read_ahead(receive))[1]
        if path == "/auth/oauth":
            return ["authorize"], receive
        if path == "/auth/oauth/decision":
            return ["authorize.decision"], receive
        if path.startswith(API_PREFIX + "/"):
            return [f"api.{method} {self._api_template(scope)}"], receive
        return [], receive

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        emulator = self.emulator
        method, path = scope["method"], scope["path"]
        if path.startswith("/_emulator"):
            try:
                await self.app(scope, receive, send)
            finally:
                emulator.save_if_changed()
            return
        names, app_receive = await self._classify(scope, receive)
        emulator.counters.add(*names)
        primary = names[0] if names else None
        faults = emulator.faults
        delay_ms = faults.latency_ms if is_api_path(path) else faults.token_delay_ms if path in TOKEN_PATHS else 0
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)
        if faults.take_drop(method, path):
            emulator.counters.add("fault.drop", *([f"{primary}.dropped"] if primary else []))
            await drop_connection(receive)
            return
        status = 0

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            rule = faults.take_fail(method, path)
            if rule is not None:
                emulator.counters.add("fault.fail")
                await self._fail_response(rule, path)(scope, app_receive, counting_send)
            else:
                await self.app(scope, app_receive, counting_send)
        finally:
            if primary and status:
                emulator.counters.add(f"{primary}.{status}")
            emulator.save_if_changed()

    def _fail_response(self, rule: FailRule, path: str) -> Response:
        headers = {"Retry-After": rule.retry_after} if rule.retry_after is not None else {}
        if rule.body is not None:
            return Response(rule.body, rule.status, headers, media_type=rule.content_type or "application/json")
        phrase = HTTPStatus(rule.status).phrase if rule.status in HTTPStatus._value2member_map_ else "Error"
        if is_api_path(path) and self.emulator.settings.html_errors:
            return Response(error_page(rule.status, phrase), rule.status, headers, media_type="text/html")
        return Response(json.dumps({"message": phrase}), rule.status, headers, media_type="application/json")
