"""What every Public API endpoint does before its own work, and how errors look.

Order: bearer token (401/403 as Salesmsg answers) -> rate limit (429) ->
scope (403 insufficient_scope) -> the handler (404, 422, ...). With
``html_errors`` every error of the API comes back as an HTML page.
"""

from __future__ import annotations

import functools
import html
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from salesmsg_emulator.grants import AuthFailure, authenticate
from salesmsg_emulator.records import AccessToken
from salesmsg_emulator.runtime import Emulator
from salesmsg_emulator.state import Store

API_PREFIX = "/pub/v2.2"


class ApiError(Exception):
    """An error answer of the API: ``status`` with a JSON ``payload``."""

    def __init__(self, status: int, payload: dict[str, Any]) -> None:
        super().__init__(payload.get("message", ""))
        self.status = status
        self.payload = payload


def not_found(what: str) -> ApiError:
    return ApiError(404, {"message": f"{what} not found."})


def invalid(errors: dict[str, list[str]]) -> ApiError:
    """A 422 shaped as Laravel answers: the first message plus every field's errors."""
    first = next(iter(errors.values()))[0]
    count = sum(len(v) for v in errors.values())
    message = first if count == 1 else f"{first} (and {count - 1} more error{'s' if count > 2 else ''})"
    return ApiError(422, {"message": message, "errors": errors})


@dataclass
class ApiContext:
    """The request, the emulator and the caller's token, handed to every handler."""

    request: Request
    emulator: Emulator
    token: AccessToken

    @property
    def store(self) -> Store:
        return self.emulator.store

    @property
    def org_id(self) -> int:
        return self.token.org_id

    @property
    def user_id(self) -> int:
        return self.token.user_id

    def now(self) -> float:
        return self.emulator.store.now()


def emulator_of(request: Request) -> Emulator:
    emulator: Emulator = request.app.state.emulator
    return emulator


def bearer_token(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


def error_page(status: int, message: str) -> str:
    """The bare HTML error page some Salesmsg errors come back as."""
    text = html.escape(message)
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{status} {text}</title></head>'
        f"<body><h1>{status}</h1><p>{text}</p></body></html>"
    )


def error_response(emulator: Emulator, status: int, payload: dict[str, Any],
                   headers: Mapping[str, str] | None = None) -> Response:  # fmt: skip
    if emulator.settings.html_errors:
        return HTMLResponse(error_page(status, str(payload.get("message", "Error"))), status, headers)
    return JSONResponse(payload, status, headers)


Handler = Callable[[ApiContext], Awaitable[Response]]


def api_endpoint(scope: str) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
    """Make ``handler`` a Starlette endpoint that requires a valid token with ``scope``."""

    def decorate(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            emulator = emulator_of(request)
            try:
                token = authenticate(emulator.store, bearer_token(request))
            except AuthFailure as failure:
                emulator.counters.add(f"auth.{failure.status}")
                return error_response(
                    emulator, failure.status, {"message": failure.message, "auth_required": failure.auth_required}
                )
            now = emulator.store.now()
            if not emulator.rate_limiter.allow(token.jti, emulator.settings.rate_limit_per_minute, now):
                emulator.counters.add("rate_limited")
                return error_response(emulator, 429, {"message": "Too Many Attempts."})
            if scope not in token.scopes:
                emulator.counters.add("insufficient_scope")
                return error_response(emulator, 403, {
                    "error": "insufficient_scope",
                    "message": f"The access token does not have the required scope: {scope}.",
                    "required_scope": scope,
                })  # fmt: skip
            try:
                return await handler(ApiContext(request, emulator, token))
            except ApiError as error:
                return error_response(emulator, error.status, error.payload)

        return endpoint

    return decorate
