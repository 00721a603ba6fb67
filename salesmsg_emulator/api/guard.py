"""What every Public API endpoint does before its own work, and how errors look.

Order: bearer token (401 without one; a malformed or dead token as the
``invalid_token_answer``/``dead_token_answer`` settings say) -> rate limit (429,
one budget per ``rate_limit_scope`` key) -> scope (403 insufficient_scope) ->
the handler (404, 422, ...). With ``html_errors`` every error of the API comes
back as an HTML page.
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
from salesmsg_emulator.payloads import conversation_payload, message_payload
from salesmsg_emulator.ratelimit import budget_key
from salesmsg_emulator.records import AccessToken, Conversation, Message
from salesmsg_emulator.runtime import Emulator, Settings
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

    def message_json(self, message: Message, now: float | None = None) -> dict[str, Any]:
        return message_payload(message, self.store, self.now() if now is None else now,
                               automated_user=self.emulator.settings.automated_messages_user)  # fmt: skip

    def conversation_json(self, conversation: Conversation, now: float | None = None) -> dict[str, Any]:
        return conversation_payload(conversation, self.store, self.now() if now is None else now,
                                    automated_user=self.emulator.settings.automated_messages_user)  # fmt: skip


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
        message = payload.get("message")
        return HTMLResponse(error_page(status, str(message) if message else "Error"), status, headers)
    return JSONResponse(payload, status, headers)


def auth_failure_answer(settings: Settings, failure: AuthFailure, *, observed_500: bool = False
                        ) -> tuple[int, dict[str, Any]]:  # fmt: skip
    """Status and body for a refused bearer token.

    No token: 401 ``{"message":"Unauthorized","auth_required":false}``. A malformed token follows
    ``invalid_token_answer``; a dead one (badly signed, unknown, expired, revoked)
    ``dead_token_answer`` (``as_invalid``: the same). ``observed``: 403 "Could not decode token: …",
    except 500 ``{"message": null}`` where the endpoint was seen doing so (``observed_500``: GET /teams).
    """
    if failure.kind == "missing":
        return 401, {"message": "Unauthorized", "auth_required": False}
    mode: str = settings.invalid_token_answer
    if failure.kind == "dead" and settings.dead_token_answer != "as_invalid":
        mode = settings.dead_token_answer
    if mode == "observed":
        mode = "500" if observed_500 else "403"
    if mode == "500":
        return 500, {"message": None}
    if mode == "401":
        return 401, {"message": "Unauthenticated.", "auth_required": True}
    return 403, {"message": f"Could not decode token: {failure.reason}", "auth_required": True}


Handler = Callable[[ApiContext], Awaitable[Response]]
Scope = str | Callable[[Settings], str]


def api_endpoint(scope: Scope, *, observed_500: bool = False
                 ) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:  # fmt: skip
    """Make ``handler`` a Starlette endpoint that requires a valid token with ``scope`` (or the scope
    a setting names). ``observed_500``: a malformed token was seen answered 500 here."""

    def decorate(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        @functools.wraps(handler)
        async def endpoint(request: Request) -> Response:
            emulator = emulator_of(request)
            settings = emulator.settings
            try:
                token = authenticate(emulator.store, bearer_token(request))
            except AuthFailure as failure:
                status, payload = auth_failure_answer(settings, failure, observed_500=observed_500)
                emulator.counters.add(f"auth.{status}", f"auth.{failure.kind}")
                return error_response(emulator, status, payload)
            now = emulator.store.now()
            with emulator.store.read():
                key = budget_key(emulator.store, token, settings.rate_limit_scope)
            if not emulator.rate_limiter.allow(key, settings.rate_limit_per_minute, now,
                                               extend_lockout=settings.rate_limit_lockout_extends):  # fmt: skip
                emulator.counters.add("rate_limited", f"org.{token.org_id}.rate_limited")
                return error_response(emulator, 429, {"message": "Too Many Attempts."})
            emulator.counters.add(f"org.{token.org_id}.served")
            required = scope(settings) if callable(scope) else scope
            if required not in token.scopes:
                emulator.counters.add("insufficient_scope")
                return error_response(emulator, 403, {
                    "error": "insufficient_scope",
                    "message": f"The access token does not have the required scope: {required}.",
                    "required_scope": required,
                })  # fmt: skip
            try:
                return await handler(ApiContext(request, emulator, token))
            except ApiError as error:
                return error_response(emulator, error.status, error.payload)

        return endpoint

    return decorate
