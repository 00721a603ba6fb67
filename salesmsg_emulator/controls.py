"""Test controls under ``/_emulator`` (404 unless ``controls_enabled``; health always answers).

Bodies and answers are JSON. ``salesmsg_emulator/README.md`` has the same list with
examples; ``EmulatorControls`` (``control_client.py``) wraps every one.

Reading:
- ``GET /_emulator/health`` -> ``{"status": "ok", "client_ids": [...], "controls_enabled": ...}``
- ``GET /_emulator/counters`` -> every counter, ``{"token.refresh": 3, "api.GET /conversations": 10, ...}``
- ``GET /_emulator/faults`` -> the faults in force
- ``GET /_emulator/settings`` -> the run-time settings
- ``GET /_emulator/clock`` -> ``{"now", "now_iso", "offset"}``
- ``GET /_emulator/orgs`` -> orgs with their users and teams
- ``GET /_emulator/rate-limits`` -> ``{"scope", "per_minute", "budgets": {key: {"in_window",
  "blocked_until"}}, "orgs": {org_id: {"served", "rate_limited"}}}`` (the counters
  ``org.<id>.served`` and ``org.<id>.rate_limited``)
- ``GET /_emulator/grants?org_id=&user_id=&client_id=`` -> grants with ``revoked``, ``revoked_reason``,
  ``refresh_count``

Resets:
- ``POST /_emulator/reset``: faults, counters, rate-limit windows and settings back to the config's
- ``POST /_emulator/counters/reset``: counters only; ``POST /_emulator/faults/reset``: faults only
- ``POST /_emulator/state/reset``: data, grants, tokens and clock back to the seed, plus ``reset``

Faults (never applied to ``/_emulator`` itself):
- ``POST /_emulator/faults/latency`` ``{"ms"}``: delay every Public API call (not the token endpoints)
- ``POST /_emulator/faults/token-delay`` ``{"ms"}``: delay the three token endpoints
- ``POST /_emulator/faults/fail`` ``{"count"=1, "status"=503, "path_prefix", "method", "retry_after",
  "body" (string or JSON), "content_type"}``: answer the next N matching requests with ``status``
- ``POST /_emulator/faults/drop`` ``{"count"=1, "path_prefix", "method"}``: close the next N matching
  connections without any HTTP answer
- ``POST /_emulator/faults/omit-refresh-token`` ``{"enabled"=true}``: refresh answers carry no
  ``refresh_token`` and the presented one is not rotated (stays valid)

State:
- ``PATCH /_emulator/settings`` ``{"auto_approve", "rate_limit_per_minute", "html_errors",
  "access_token_ttl", "pat_ttl", "code_ttl", "sent_delay", "delivered_delay", "rate_limit_scope",
  "rate_limit_lockout_extends", "invalid_token_answer", "dead_token_answer", "contacts_list_scope",
  "automated_messages_user"}`` (any subset)
- ``POST /_emulator/clock/advance`` ``{"seconds"}``: move the clock forward (codes and tokens expire,
  message statuses progress, rate-limit lockouts end)
- ``POST /_emulator/grants/revoke`` ``{"org_id", "user_id", "client_id", "access_token"}``: revoke the
  matching grants (all their access and refresh tokens); an ``access_token`` that is a PAT revokes it
- ``POST /_emulator/tokens/expire`` (same selectors): the matching access tokens (PATs too) expire now
- ``POST /_emulator/pats`` ``{"user_id", "scopes", "ttl_seconds"}`` -> ``{"token", ...}``
- ``POST /_emulator/messages/inbound`` ``{"conversation_id", "body", "media_urls"}`` -> the message
- ``PATCH /_emulator/clients/{client_id}`` ``{"baa_signed"}``; ``PATCH /_emulator/orgs/{org_id}`` ``{"hipaa"}``
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from salesmsg_emulator.api.guard import emulator_of
from salesmsg_emulator.faults import DropRule, FailRule
from salesmsg_emulator.grants import (
    find_token,
    issue_pat,
    revoke_grant,
    select_grants,
    select_tokens,
)
from salesmsg_emulator.messaging import receive_inbound
from salesmsg_emulator.payloads import iso, message_payload
from salesmsg_emulator.request_body import parse_json
from salesmsg_emulator.runtime import Emulator
from salesmsg_emulator.scopes import parse_scope, unknown_scopes

PREFIX = "/_emulator"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DelayBody(_Body):
    ms: int = Field(ge=0, le=600_000)


class FailBody(_Body):
    count: int = Field(default=1, ge=1)
    status: int = Field(default=503, ge=400, le=599)
    path_prefix: str | None = None
    method: str | None = None
    retry_after: str | int | None = None
    body: str | dict[str, Any] | list[Any] | None = None
    content_type: str | None = None


class DropBody(_Body):
    count: int = Field(default=1, ge=1)
    path_prefix: str | None = None
    method: str | None = None


class ToggleBody(_Body):
    enabled: bool = True


class AdvanceBody(_Body):
    seconds: float = Field(ge=0)


class SelectorBody(_Body):
    org_id: int | None = None
    user_id: int | None = None
    client_id: str | None = None
    access_token: str | None = None


class PatBody(_Body):
    user_id: int
    scopes: list[str]
    ttl_seconds: int | None = Field(default=None, gt=0)

    @field_validator("scopes", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return parse_scope(value) if isinstance(value, str | list) else value


class InboundBody(_Body):
    conversation_id: int
    body: str = Field(min_length=1, max_length=1600)
    media_urls: list[str] = Field(default_factory=list)


class BaaBody(_Body):
    baa_signed: bool


class HipaaBody(_Body):
    hipaa: bool


_B = TypeVar("_B", bound=_Body)


class ControlError(Exception):
    def __init__(self, status: int, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.status, self.message, self.detail = status, message, detail


async def _parse(request: Request, model: type[_B]) -> _B:
    raw = await request.body()
    try:
        data = parse_json(raw) if raw.strip() else {}
        return model.model_validate(data)
    except ValueError as exc:
        detail = exc.errors(include_url=False, include_context=False) if isinstance(exc, ValidationError) else None
        raise ControlError(422, "invalid control body", detail) from None


Handler = Callable[[Request, Emulator], Awaitable[Any]]


def control(handler: Handler, *, always: bool = False) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        emulator = emulator_of(request)
        if not (always or emulator.config.controls_enabled):
            return JSONResponse({"message": "Not Found"}, 404)
        try:
            result = await handler(request, emulator)
        except ControlError as error:
            return JSONResponse({"message": error.message, "detail": error.detail}, error.status)
        return result if isinstance(result, Response) else JSONResponse(result)

    return endpoint


def _selector(body: SelectorBody) -> dict[str, Any]:
    selector = body.model_dump(exclude_none=True)
    if not selector:
        raise ControlError(422, "give at least one of org_id, user_id, client_id, access_token")
    return selector


async def health(request: Request, emulator: Emulator) -> Any:
    return {"status": "ok", "client_ids": [c.client_id for c in emulator.config.clients],
            "controls_enabled": emulator.config.controls_enabled}  # fmt: skip


async def counters(request: Request, emulator: Emulator) -> Any:
    return emulator.counters.snapshot()


async def reset_counters(request: Request, emulator: Emulator) -> Any:
    emulator.counters.reset()
    return {"ok": True}


async def reset(request: Request, emulator: Emulator) -> Any:
    emulator.reset_controls()
    return {"ok": True}


async def reset_state(request: Request, emulator: Emulator) -> Any:
    emulator.reset_state()
    return {"ok": True}


async def faults(request: Request, emulator: Emulator) -> Any:
    return emulator.faults.snapshot()


async def set_latency(request: Request, emulator: Emulator) -> Any:
    emulator.faults.latency_ms = (await _parse(request, DelayBody)).ms
    return emulator.faults.snapshot()


async def set_token_delay(request: Request, emulator: Emulator) -> Any:
    emulator.faults.token_delay_ms = (await _parse(request, DelayBody)).ms
    return emulator.faults.snapshot()


async def fail_next(request: Request, emulator: Emulator) -> Any:
    body = await _parse(request, FailBody)
    payload = body.body if isinstance(body.body, str | None) else json.dumps(body.body)
    emulator.faults.add_fail(FailRule(
        remaining=body.count, status=body.status, path_prefix=body.path_prefix, method=body.method,
        retry_after=None if body.retry_after is None else str(body.retry_after), body=payload,
        content_type=body.content_type,
    ))  # fmt: skip
    return emulator.faults.snapshot()


async def drop_next(request: Request, emulator: Emulator) -> Any:
    body = await _parse(request, DropBody)
    emulator.faults.add_drop(DropRule(remaining=body.count, path_prefix=body.path_prefix, method=body.method))
    return emulator.faults.snapshot()


async def omit_refresh_token(request: Request, emulator: Emulator) -> Any:
    emulator.faults.omit_refresh_token = (await _parse(request, ToggleBody)).enabled
    return emulator.faults.snapshot()


async def reset_faults(request: Request, emulator: Emulator) -> Any:
    emulator.faults.reset()
    return emulator.faults.snapshot()


async def settings(request: Request, emulator: Emulator) -> Any:
    if request.method == "PATCH":
        raw = await request.body()
        try:
            changes = parse_json(raw) if raw.strip() else {}
            if not isinstance(changes, dict):
                raise ValueError("the body must be a JSON object")
            emulator.settings.update(changes)
        except ValueError as exc:
            raise ControlError(422, str(exc)) from None
    return emulator.settings.as_dict()


async def clock(request: Request, emulator: Emulator) -> Any:
    now = emulator.store.now()
    return {"now": now, "now_iso": iso(now), "offset": emulator.store.clock.offset}


async def advance_clock(request: Request, emulator: Emulator) -> Any:
    emulator.store.clock.advance((await _parse(request, AdvanceBody)).seconds)
    return await clock(request, emulator)


async def orgs(request: Request, emulator: Emulator) -> Any:
    with emulator.store.read() as store:
        return [
            {"id": o.id, "name": o.name, "hipaa": o.hipaa,
             "users": [{"id": u.id, "name": f"{u.first_name} {u.last_name}", "email": u.email, "role": u.role}
                       for u in store.org_users(o.id)],
             "teams": [{"id": t.id, "name": t.name, "number": t.number} for t in store.org_teams(o.id)]}
            for o in sorted(store.orgs.values(), key=lambda o: o.id)
        ]  # fmt: skip


async def rate_limits(request: Request, emulator: Emulator) -> Any:
    counts = emulator.counters.snapshot()
    orgs: dict[str, dict[str, int]] = {}
    for name, value in counts.items():
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == "org" and parts[2] in ("served", "rate_limited"):
            orgs.setdefault(parts[1], {"served": 0, "rate_limited": 0})[parts[2]] = value
    now = emulator.store.now()
    budgets = {
        key: {"in_window": b["in_window"], "blocked_until": iso(b["blocked_until"]) if b["blocked_until"] else None}
        for key, b in emulator.rate_limiter.snapshot(now).items()
    }
    return {"scope": emulator.settings.rate_limit_scope, "per_minute": emulator.settings.rate_limit_per_minute,
            "budgets": budgets, "orgs": orgs}  # fmt: skip


async def grants(request: Request, emulator: Emulator) -> Any:
    q = request.query_params
    with emulator.store.read() as store:
        rows = select_grants(store, org_id=int(q["org_id"]) if q.get("org_id") else None,
                             user_id=int(q["user_id"]) if q.get("user_id") else None,
                             client_id=q.get("client_id") or None)  # fmt: skip
        return [
            {"id": g.id, "client_id": g.client_id, "org_id": g.org_id, "user_id": g.user_id, "scopes": g.scopes,
             "created_at": iso(g.created_at), "revoked": g.revoked_at is not None, "revoked_reason": g.revoked_reason,
             "refresh_count": sum(1 for r in store.refresh_tokens.values() if r.grant_id == g.id) - 1}
            for g in sorted(rows, key=lambda g: g.created_at)
        ]  # fmt: skip


async def revoke(request: Request, emulator: Emulator) -> Any:
    selector = _selector(await _parse(request, SelectorBody))
    with emulator.store.write() as store:
        revoked_grants, revoked_pats = [], 0
        if "access_token" in selector:
            token = find_token(store, selector.pop("access_token"))
            if token is None:
                raise ControlError(404, "unknown access token")
            if token.grant_id:
                revoked_grants.append(store.grants[token.grant_id])
            elif token.revoked_at is None:
                token.revoked_at, revoked_pats = store.now(), 1
        if selector:
            revoked_grants += select_grants(store, **selector)
        for grant in revoked_grants:
            revoke_grant(store, grant, "revoked by control")
        return {"revoked_grants": len({g.id for g in revoked_grants}), "revoked_pats": revoked_pats}


async def expire(request: Request, emulator: Emulator) -> Any:
    selector = _selector(await _parse(request, SelectorBody))
    with emulator.store.write() as store:
        tokens = []
        if "access_token" in selector:
            token = find_token(store, selector.pop("access_token"))
            if token is None:
                raise ControlError(404, "unknown access token")
            tokens.append(token)
        if selector:
            tokens += select_tokens(store, **selector)
        now = store.now()
        for token in tokens:
            token.expires_at = min(token.expires_at or now, now) - 0.001
        return {"expired": len({t.jti for t in tokens})}


async def create_pat(request: Request, emulator: Emulator) -> Any:
    body = await _parse(request, PatBody)
    if not body.scopes or unknown_scopes(body.scopes):
        raise ControlError(422, f"unknown or missing scopes: {' '.join(unknown_scopes(body.scopes))}")
    try:
        tokens = issue_pat(emulator.store, body.user_id, body.scopes, body.ttl_seconds)
    except KeyError:
        raise ControlError(404, f"unknown user {body.user_id}") from None
    user = emulator.store.users[body.user_id]
    return {"token": tokens.access_token, "user_id": user.id, "org_id": user.org_id, "scopes": tokens.scopes,
            "expires_in": body.ttl_seconds}  # fmt: skip


async def inbound(request: Request, emulator: Emulator) -> Any:
    body = await _parse(request, InboundBody)
    with emulator.store.write() as store:
        conversation = store.conversations.get(body.conversation_id)
        if conversation is None:
            raise ControlError(404, f"unknown conversation {body.conversation_id}")
        message = receive_inbound(store, conversation, body=body.body, media_urls=body.media_urls)
        return message_payload(message, store, store.now())


async def patch_client(request: Request, emulator: Emulator) -> Any:
    body = await _parse(request, BaaBody)
    with emulator.store.write() as store:
        client = store.clients.get(request.path_params["client_id"])
        if client is None:
            raise ControlError(404, "unknown client")
        client.baa_signed = body.baa_signed
        return {"client_id": client.client_id, "baa_signed": client.baa_signed}


async def patch_org(request: Request, emulator: Emulator) -> Any:
    body = await _parse(request, HipaaBody)
    with emulator.store.write() as store:
        org = store.orgs.get(request.path_params["org_id"])
        if org is None:
            raise ControlError(404, "unknown org")
        org.hipaa = body.hipaa
        return {"id": org.id, "name": org.name, "hipaa": org.hipaa}


def routes() -> list[Route]:
    p = PREFIX
    return [
        Route(f"{p}/health", control(health, always=True), methods=["GET"]),
        Route(f"{p}/counters", control(counters), methods=["GET"]),
        Route(f"{p}/counters/reset", control(reset_counters), methods=["POST"]),
        Route(f"{p}/reset", control(reset), methods=["POST"]),
        Route(f"{p}/state/reset", control(reset_state), methods=["POST"]),
        Route(f"{p}/faults", control(faults), methods=["GET"]),
        Route(f"{p}/faults/latency", control(set_latency), methods=["POST"]),
        Route(f"{p}/faults/token-delay", control(set_token_delay), methods=["POST"]),
        Route(f"{p}/faults/fail", control(fail_next), methods=["POST"]),
        Route(f"{p}/faults/drop", control(drop_next), methods=["POST"]),
        Route(f"{p}/faults/omit-refresh-token", control(omit_refresh_token), methods=["POST"]),
        Route(f"{p}/faults/reset", control(reset_faults), methods=["POST"]),
        Route(f"{p}/settings", control(settings), methods=["GET", "PATCH"]),
        Route(f"{p}/clock", control(clock), methods=["GET"]),
        Route(f"{p}/clock/advance", control(advance_clock), methods=["POST"]),
        Route(f"{p}/orgs", control(orgs), methods=["GET"]),
        Route(f"{p}/rate-limits", control(rate_limits), methods=["GET"]),
        Route(f"{p}/orgs/{{org_id:int}}", control(patch_org), methods=["PATCH"]),
        Route(f"{p}/grants", control(grants), methods=["GET"]),
        Route(f"{p}/grants/revoke", control(revoke), methods=["POST"]),
        Route(f"{p}/tokens/expire", control(expire), methods=["POST"]),
        Route(f"{p}/pats", control(create_pat), methods=["POST"]),
        Route(f"{p}/messages/inbound", control(inbound), methods=["POST"]),
        Route(f"{p}/clients/{{client_id}}", control(patch_client), methods=["PATCH"]),
    ]
