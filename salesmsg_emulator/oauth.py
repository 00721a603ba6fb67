"""The OAuth2 endpoints: the authorize page and the three token endpoints.

- ``GET /auth/oauth``: validates the request, then shows the sign-in and
  approve page (or, with ``auto_approve``, redirects straight back with a code).
- ``POST /auth/oauth/decision``: the page's form; redirects (303) with
  ``code`` and ``state`` or ``error=access_denied``.
- ``POST /pub/v2.2/oauth/token``: ``authorization_code`` and ``refresh_token``.
- ``POST /pub/v2.2/oauth/token/refresh``: refresh only (Salesmsg's documented endpoint).
- ``POST /pub/v2.2/oauth/personal-token/refresh``: a new PAT for the bearer PAT.

Token requests are form-encoded or JSON; the client authenticates in the body
or with HTTP Basic. Errors are RFC 6749 JSON, never HTML.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit, urlunsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from salesmsg_emulator.api.guard import API_PREFIX, auth_failure_answer, bearer_token, emulator_of
from salesmsg_emulator.grants import (
    AuthFailure,
    AuthorizeError,
    BaaRequired,
    OAuthError,
    TokenSet,
    authenticate_client,
    exchange_code,
    issue_code,
    refresh_grant,
    refresh_pat,
    start_authorization,
    take_pending,
)
from salesmsg_emulator.records import User
from salesmsg_emulator.request_body import parse_json
from salesmsg_emulator.runtime import Emulator
from salesmsg_emulator.scopes import PHI_SCOPES, SCOPES

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def redirect_target(redirect_uri: str, params: dict[str, str | None]) -> str:
    """``redirect_uri`` with ``params`` added to its query (None values left out)."""
    parts = urlsplit(redirect_uri)
    query = parse_qsl(parts.query, keep_blank_values=True) + [(k, v) for k, v in params.items() if v is not None]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _error_page(request: Request, emulator: Emulator, title: str, message: str) -> Response:
    return emulator.templates.TemplateResponse(request, "error.html", {"title": title, "message": message},
                                               status_code=400)  # fmt: skip


def _pick_user(emulator: Emulator, hint: str | None) -> User | None:
    """The user a ``user_id``/``login_hint`` names (id or e-mail), or None."""
    if not hint:
        return None
    store = emulator.store
    if hint.isdigit() and int(hint) in store.users:
        return store.users[int(hint)]
    return next((u for u in store.users.values() if u.email.lower() == hint.lower()), None)


def _default_user(emulator: Emulator) -> User:
    """The first user of the first org, in config order."""
    first_org = emulator.config.orgs[0].id
    user = next((u for u in emulator.config.users if u.org == first_org), emulator.config.users[0])
    return emulator.store.users[user.id]


async def authorize(request: Request) -> Response:
    emulator = emulator_of(request)
    params = dict(request.query_params)
    try:
        pending = start_authorization(emulator.store, params)
    except AuthorizeError as error:
        emulator.counters.add(f"authorize.error.{error.error}")
        if error.redirect and error.redirect_uri:
            target = redirect_target(error.redirect_uri, {"error": error.error, "error_description": error.description,
                                                          "state": error.state})  # fmt: skip
            return RedirectResponse(target, 302)
        return _error_page(request, emulator, "Invalid authorization request", error.description)
    hint = params.get("user_id") or params.get("login_hint")
    user = _pick_user(emulator, hint)
    if hint and user is None:
        return _error_page(request, emulator, "Unknown user", "The user named by user_id or login_hint does not exist.")
    if emulator.settings.auto_approve:
        user = user or _default_user(emulator)
        take_pending(emulator.store, pending.id)
        code = issue_code(emulator.store, pending, user.id, emulator.settings.code_ttl)
        emulator.counters.add("authorize.approved")
        return RedirectResponse(redirect_target(pending.redirect_uri, {"code": code, "state": pending.state}), 302)
    with emulator.store.read():
        store = emulator.store
        client = store.clients[pending.client_id]
        orgs = [
            {"name": org.name, "hipaa": org.hipaa, "users": store.org_users(org.id)}
            for org in sorted(store.orgs.values(), key=lambda o: o.id)
        ]
    scopes = [{"name": s, "description": SCOPES[s], "phi": s in PHI_SCOPES} for s in pending.scopes]
    context: dict[str, Any] = {
        "client": client, "scopes": scopes, "orgs": orgs, "request_id": pending.id,
        "selected_user_id": user.id if user else None, "any_phi": any(s["phi"] for s in scopes),
    }  # fmt: skip
    return emulator.templates.TemplateResponse(request, "authorize.html", context, headers=_NO_STORE)


async def decide(request: Request) -> Response:
    emulator = emulator_of(request)
    form = await request.form()
    request_id, decision = str(form.get("request_id", "")), str(form.get("decision", ""))
    with emulator.store.read():
        pending = emulator.store.pending.get(request_id)
    if pending is None:
        return _error_page(
            request,
            emulator,
            "Request expired",
            "This sign-in request has expired or was already answered. Start again from the app.",
        )
    if decision == "deny":
        take_pending(emulator.store, request_id)
        emulator.counters.add("authorize.denied")
        target = redirect_target(pending.redirect_uri, {"error": "access_denied", "state": pending.state})
        return RedirectResponse(target, 303)
    user = _pick_user(emulator, str(form.get("user_id", "")))
    if decision != "approve" or user is None:
        return _error_page(request, emulator, "Invalid decision", "Choose a user, then Approve or Deny.")
    if take_pending(emulator.store, request_id) is None:
        return _error_page(request, emulator, "Request expired", "This sign-in request has expired.")
    code = issue_code(emulator.store, pending, user.id, emulator.settings.code_ttl)
    emulator.counters.add("authorize.approved")
    return RedirectResponse(redirect_target(pending.redirect_uri, {"code": code, "state": pending.state}), 303)


# --- token endpoints -------------------------------------------------------------


async def _token_params(request: Request) -> tuple[dict[str, str], bool]:
    """The request's parameters (form or JSON) with Basic credentials folded in; and whether Basic was used."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    params: dict[str, str] = {}
    if content_type.endswith("json"):
        try:
            body = parse_json(await request.body() or b"{}")
        except ValueError:
            raise OAuthError("invalid_request", "The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise OAuthError("invalid_request", "The request body must be a JSON object.")
        params = {k: v if isinstance(v, str) else json.dumps(v) for k, v in body.items() if v is not None}
    elif content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.form()
        params = {k: v for k, v in form.items() if isinstance(v, str)}
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return params, False
    try:
        client_id, sep, secret = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise OAuthError("invalid_client", "Malformed HTTP Basic credentials.", 401) from None
    if not sep:
        raise OAuthError("invalid_client", "Malformed HTTP Basic credentials.", 401)
    client_id, secret = unquote_plus(client_id), unquote_plus(secret)
    if params.get("client_id") not in (None, client_id):
        raise OAuthError("invalid_request", "client_id in the body differs from the HTTP Basic credentials.")
    params["client_id"], params["client_secret"] = client_id, secret
    return params, True


def _oauth_error(emulator: Emulator, grant: str, error: OAuthError, basic: bool) -> Response:
    emulator.counters.add(f"token.{grant}.{error.error}")
    if error.reuse:
        emulator.counters.add("grant.reuse_detected")
    headers = dict(_NO_STORE)
    if error.status == 401 and basic:
        headers["WWW-Authenticate"] = 'Basic realm="salesmsg-emulator"'
    return JSONResponse({"error": error.error, "error_description": error.description}, error.status, headers)


def _baa_denied(emulator: Emulator, grant: str, denial: BaaRequired) -> Response:
    emulator.counters.add(f"token.{grant}.baa_required")
    return JSONResponse({"message": str(denial)}, 403, _NO_STORE)


def _refresh_answer(emulator: Emulator, params: dict[str, str]) -> Response:
    client = authenticate_client(emulator.store, params.get("client_id"), params.get("client_secret"))
    omit = emulator.faults.omit_refresh_token
    tokens = refresh_grant(emulator.store, client, refresh_token=params.get("refresh_token"),
                           scope=params.get("scope"), access_ttl=emulator.settings.access_token_ttl,
                           rotate=not omit)  # fmt: skip
    return _token_answer(tokens)


def _token_answer(tokens: TokenSet) -> Response:
    return JSONResponse(tokens.as_json(), 200, _NO_STORE)


async def token(request: Request) -> Response:
    """``POST /oauth/token``: the authorization_code and refresh_token grants."""
    emulator = emulator_of(request)
    grant, basic = "unknown", False
    try:
        params, basic = await _token_params(request)
        grant_type = params.get("grant_type")
        if grant_type == "authorization_code":
            grant = "authorization_code"
            client = authenticate_client(emulator.store, params.get("client_id"), params.get("client_secret"))
            tokens = exchange_code(emulator.store, client, code=params.get("code"),
                                   redirect_uri=params.get("redirect_uri"), code_verifier=params.get("code_verifier"),
                                   access_ttl=emulator.settings.access_token_ttl)  # fmt: skip
            return _token_answer(tokens)
        if grant_type == "refresh_token":
            grant = "refresh"
            return _refresh_answer(emulator, params)
        if not grant_type:
            raise OAuthError("invalid_request", "The grant_type parameter is required.")
        raise OAuthError("unsupported_grant_type", "Only authorization_code and refresh_token are supported.")
    except OAuthError as error:
        return _oauth_error(emulator, grant, error, basic)
    except BaaRequired as denial:
        return _baa_denied(emulator, grant, denial)


async def token_refresh(request: Request) -> Response:
    """``POST /oauth/token/refresh``: Salesmsg's documented refresh endpoint (JSON or form)."""
    emulator = emulator_of(request)
    basic = False
    try:
        params, basic = await _token_params(request)
        if params.get("grant_type", "refresh_token") != "refresh_token":
            raise OAuthError("unsupported_grant_type", "This endpoint only accepts grant_type=refresh_token.")
        return _refresh_answer(emulator, params)
    except OAuthError as error:
        return _oauth_error(emulator, "refresh", error, basic)
    except BaaRequired as denial:
        return _baa_denied(emulator, "refresh", denial)


async def personal_token_refresh(request: Request) -> Response:
    """``POST /oauth/personal-token/refresh``: trade the bearer PAT for a new one (no refresh token)."""
    emulator = emulator_of(request)
    try:
        tokens = refresh_pat(emulator.store, bearer_token(request), emulator.settings.pat_ttl)
    except AuthFailure as failure:
        status, payload = auth_failure_answer(emulator.settings, failure)
        emulator.counters.add(f"token.pat_refresh.auth_{status}")
        return JSONResponse(payload, status)
    except OAuthError as error:
        return _oauth_error(emulator, "pat_refresh", error, False)
    return JSONResponse(tokens.as_json(include_scope=False), 200, _NO_STORE)


TOKEN_PATH = f"{API_PREFIX}/oauth/token"
REFRESH_PATH = f"{API_PREFIX}/oauth/token/refresh"
PAT_REFRESH_PATH = f"{API_PREFIX}/oauth/personal-token/refresh"


def routes() -> list[Route]:
    return [
        Route("/auth/oauth", authorize, methods=["GET"]),
        Route("/auth/oauth/decision", decide, methods=["POST"]),
        Route(TOKEN_PATH, token, methods=["POST"]),
        Route(REFRESH_PATH, token_refresh, methods=["POST"]),
        Route(PAT_REFRESH_PATH, personal_token_refresh, methods=["POST"]),
    ]
