"""Conversations and messages: listing, threads, sending, close/open/reassign."""

from __future__ import annotations

import math
from collections.abc import Callable

from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from salesmsg_emulator.api.guard import (
    API_PREFIX,
    ApiContext,
    ApiError,
    api_endpoint,
    invalid,
    not_found,
)
from salesmsg_emulator.api.inputs import (
    Inputs,
    int_param,
    media_url_errors,
    page_param,
    read_input,
    text_errors,
    time_param,
)
from salesmsg_emulator.messaging import (
    MAX_MESSAGE_LENGTH,
    Delays,
    find_or_create_contact,
    find_or_create_conversation,
    find_or_start_conversation,
    normalize_number,
    send_outbound,
)
from salesmsg_emulator.payloads import micros
from salesmsg_emulator.records import Conversation, Message
from salesmsg_emulator.state import Store

MAX_LIMIT = 100
DEFAULT_LIMIT = 20

Filter = Callable[[Conversation, Store, int], bool]
FILTERS: dict[str, Filter] = {
    "all": lambda c, s, u: True,
    "open": lambda c, s, u: c.closed_at is None,
    "closed": lambda c, s, u: c.closed_at is not None,
    "unread": lambda c, s, u: c.unread_count > 0,
    "assigned": lambda c, s, u: c.owner_id is not None,
    "unassigned": lambda c, s, u: c.owner_id is None,
    "mine": lambda c, s, u: c.owner_id == u,
    "outbound": lambda c, s, u: (m := s.latest_message(c.id)) is not None and m.direction == "outbound",
    "inbound": lambda c, s, u: (m := s.latest_message(c.id)) is not None and m.direction == "inbound",
    "optout": lambda c, s, u: s.contacts[c.contact_id].opt_out,
    "blocked": lambda c, s, u: s.contacts[c.contact_id].is_blocked,
    "nocalls": lambda c, s, u: all(m.type != "call" for m in s.thread(c.id)),
}


def _conversation(ctx: ApiContext) -> Conversation:
    params = ctx.request.path_params
    conversation = ctx.store.org_conversation(ctx.org_id, int(params.get("id") or params["conversation_id"]))
    if conversation is None:
        raise not_found("Conversation")
    return conversation


def _matches_query(ctx: ApiContext, conversation: Conversation, query: str) -> bool:
    contact = ctx.store.contacts[conversation.contact_id]
    name = f"{contact.first_name or ''} {contact.last_name or ''}".lower()
    digits = "".join(ch for ch in query if ch.isdigit())
    return query.lower() in name or (len(digits) >= 3 and digits in contact.number)


@api_endpoint("conversations:read")
async def list_conversations(ctx: ApiContext) -> Response:
    params = ctx.request.query_params
    limit = int_param(params.get("limit"), "limit", DEFAULT_LIMIT, minimum=1, maximum=MAX_LIMIT)
    offset = int_param(params.get("offset"), "offset", 0)
    before = time_param(params.get("before"), "before")
    after = time_param(params.get("after"), "after")
    names = [n.strip().lower() for n in (params.get("filter") or "all").split(",") if n.strip()] or ["all"]
    unknown = [n for n in names if n not in FILTERS]
    if unknown:
        raise invalid({"filter": [f"The selected filter is invalid: {', '.join(unknown)}."]})
    query = (params.get("query") or params.get("search") or "").strip()
    with ctx.store.read():
        rows = [
            c for c in ctx.store.org_conversations(ctx.org_id)
            if all(FILTERS[n](c, ctx.store, ctx.user_id) for n in names)
            and (before is None or micros(c.updated_at) < micros(before))
            and (after is None or micros(c.updated_at) > micros(after))
            and (not query or _matches_query(ctx, c, query))
        ]  # fmt: skip
        rows.sort(key=lambda c: (c.updated_at, c.id), reverse=True)
        now = ctx.now()
        return JSONResponse([ctx.conversation_json(c, now) for c in rows[offset : offset + limit]])


@api_endpoint("conversations:read")
async def get_conversation(ctx: ApiContext) -> Response:
    with ctx.store.read():
        return JSONResponse(ctx.conversation_json(_conversation(ctx)))


async def _set_closed(ctx: ApiContext, closed: bool) -> Response:
    with ctx.store.write():
        conversation = _conversation(ctx)
        if closed and conversation.closed_at is None:
            conversation.closed_at = ctx.now()
        elif not closed:
            conversation.closed_at = None
        return JSONResponse(ctx.conversation_json(conversation))


@api_endpoint("conversations:write")
async def close_conversation(ctx: ApiContext) -> Response:
    return await _set_closed(ctx, True)


@api_endpoint("conversations:write")
async def open_conversation(ctx: ApiContext) -> Response:
    return await _set_closed(ctx, False)


@api_endpoint("conversations:write")
async def reassign_conversation(ctx: ApiContext) -> Response:
    inputs = await read_input(ctx.request)
    if not inputs.has("user_id"):
        raise invalid({"user_id": ["The user id field is required."]})
    raw = inputs.get("user_id")
    user_id = None if raw in (None, "", "null", 0, "0") else int_param(raw, "user_id", 0, minimum=1)
    with ctx.store.write():
        conversation = _conversation(ctx)
        if user_id is not None and ctx.store.org_user(ctx.org_id, user_id) is None:
            raise invalid({"user_id": ["The selected user id is invalid."]})
        conversation.owner_id = user_id
        return JSONResponse(ctx.conversation_json(conversation))


def _newest_first(ctx: ApiContext, conversation: Conversation) -> list[Message]:
    return list(reversed(ctx.store.thread(conversation.id)))


async def _cursor_page(ctx: ApiContext) -> Response:
    params = ctx.request.query_params
    limit = int_param(params.get("limit"), "limit", DEFAULT_LIMIT, minimum=1, maximum=MAX_LIMIT)
    before_id = int_param(params.get("before_id"), "before_id", 0)
    with ctx.store.read():
        messages = _newest_first(ctx, _conversation(ctx))
        if before_id:
            messages = [m for m in messages if m.id < before_id]
        now = ctx.now()
        return JSONResponse([ctx.message_json(m, now) for m in messages[:limit]])


@api_endpoint("messages:read")
async def conversation_messages(ctx: ApiContext) -> Response:
    return await _cursor_page(ctx)


@api_endpoint("messages:read")
async def messages_by_cursor(ctx: ApiContext) -> Response:
    return await _cursor_page(ctx)


@api_endpoint("messages:read")
async def messages_paginated(ctx: ApiContext) -> Response:
    params = ctx.request.query_params
    page = page_param(params.get("page"))
    per_page = int_param(params.get("per_page"), "per_page", DEFAULT_LIMIT, minimum=1, maximum=MAX_LIMIT)
    with ctx.store.read():
        messages = _newest_first(ctx, _conversation(ctx))
        now = ctx.now()
        chunk = messages[(page - 1) * per_page : page * per_page]
        return JSONResponse({
            "data": [ctx.message_json(m, now) for m in chunk],
            "meta": {"current_page": page, "last_page": max(1, math.ceil(len(messages) / per_page)),
                     "per_page": per_page, "total": len(messages)},
        })  # fmt: skip


def _message_fields(inputs: Inputs) -> tuple[str, float | None, list[str], dict[str, list[str]]]:
    """The message, send_at and media URLs of a send, with every validation error found."""
    errors: dict[str, list[str]] = {}
    body = inputs.get("message")
    if problems := text_errors(body, "message", required=True, max_length=MAX_MESSAGE_LENGTH):
        errors["message"] = problems
    if problems := media_url_errors(inputs.media_urls):
        errors["media_url"] = problems
    send_at = None
    try:
        send_at = time_param(inputs.get("send_at"), "send_at")
    except ApiError as error:
        errors.update(error.payload["errors"])
    return body, send_at, [str(u) for u in inputs.media_urls], errors


def _team_id(ctx: ApiContext, raw: object, errors: dict[str, list[str]]) -> int | None:
    if raw in (None, ""):
        errors["team_id"] = ["The team id field is required."]
        return None
    try:
        team_id = int(str(raw))
    except ValueError:
        team_id = 0
    if ctx.store.org_team(ctx.org_id, team_id) is None:
        errors["team_id"] = ["The selected team id is invalid."]
        return None
    return team_id


def _number(raw: object, errors: dict[str, list[str]]) -> str | None:
    if raw in (None, ""):
        errors["number"] = ["The number field is required."]
        return None
    number = normalize_number(str(raw))
    if number is None:
        errors["number"] = ["The number format is invalid."]
    return number


def _send(ctx: ApiContext, inputs: Inputs, conversation: Conversation) -> Response:
    body, send_at, media, errors = _message_fields(inputs)
    if errors:
        raise invalid(errors)
    message = send_outbound(
        ctx.store, conversation, user_id=ctx.user_id, body=body, send_at=send_at, media_urls=media,
        delays=Delays(ctx.emulator.settings.sent_delay, ctx.emulator.settings.delivered_delay),
    )  # fmt: skip
    conversation.unread_count = 0
    return JSONResponse(ctx.message_json(message), 201)


@api_endpoint("messages:write")
async def send_to_conversation(ctx: ApiContext) -> Response:
    inputs = await read_input(ctx.request)
    with ctx.store.write():
        return _send(ctx, inputs, _conversation(ctx))


@api_endpoint("messages:write")
async def send_to_number(ctx: ApiContext) -> Response:
    inputs = await read_input(ctx.request)
    with ctx.store.write():
        errors = _message_fields(inputs)[3]
        number = _number(inputs.get("number"), errors)
        team_id = _team_id(ctx, inputs.get("team_id"), errors)
        if errors or number is None or team_id is None:
            raise invalid(errors)
        contact = find_or_create_contact(ctx.store, ctx.org_id, number)
        conversation = find_or_create_conversation(ctx.store, ctx.org_id, contact, team_id)
        return _send(ctx, inputs, conversation)


def _conversation_team(ctx: ApiContext, inputs: Inputs, errors: dict[str, list[str]]) -> int | None:
    """``team_id`` (or ``number_id``: a team's number has the team's id); the org's first team when
    neither is given (Salesmsg's default is not published)."""
    for name in ("team_id", "number_id"):
        raw = inputs.get(name)
        if raw not in (None, ""):
            try:
                team_id = int(str(raw))
            except ValueError:
                team_id = 0
            if ctx.store.org_team(ctx.org_id, team_id) is None:
                errors[name] = [f"The selected {name.replace('_', ' ')} is invalid."]
                return None
            return team_id
    teams = ctx.store.org_teams(ctx.org_id)
    if not teams:
        errors["team_id"] = ["The team id field is required."]
        return None
    return teams[0].id


@api_endpoint("conversations:write")
async def start_conversation(ctx: ApiContext) -> Response:
    """``POST /conversations``: find or start the conversation with a contact (``contact_id``, or a
    ``number``, creating the contact) in a team; 201 when started, 200 when it existed."""
    inputs = await read_input(ctx.request)
    with ctx.store.write():
        errors: dict[str, list[str]] = {}
        contact, number = None, None
        raw_contact = inputs.get("contact_id")
        if raw_contact not in (None, ""):
            try:
                contact = ctx.store.org_contact(ctx.org_id, int(str(raw_contact)))
            except ValueError:
                contact = None
            if contact is None:
                errors["contact_id"] = ["The selected contact id is invalid."]
        elif inputs.get("number") not in (None, ""):
            number = _number(inputs.get("number"), errors)
        else:
            errors["contact_id"] = ["The contact id field is required when number is not present."]
        team_id = _conversation_team(ctx, inputs, errors)
        if errors or team_id is None:
            raise invalid(errors)
        if contact is None:
            if number is None:
                raise invalid({"number": ["The number format is invalid."]})
            contact = find_or_create_contact(ctx.store, ctx.org_id, number)
        conversation, created = find_or_start_conversation(ctx.store, ctx.org_id, contact, team_id)
        return JSONResponse(ctx.conversation_json(conversation), 201 if created else 200)


def routes() -> list[Route]:
    p = API_PREFIX
    return [
        Route(f"{p}/conversations", list_conversations, methods=["GET"]),
        Route(f"{p}/conversations", start_conversation, methods=["POST"]),
        Route(f"{p}/conversations/{{id:int}}", get_conversation, methods=["GET"]),
        Route(f"{p}/conversations/{{id:int}}/close", close_conversation, methods=["PUT", "POST"]),
        Route(f"{p}/conversations/{{id:int}}/open", open_conversation, methods=["PUT", "POST"]),
        Route(f"{p}/conversations/{{id:int}}/reassign", reassign_conversation, methods=["POST", "PUT"]),
        Route(f"{p}/conversations/{{id:int}}/messages", conversation_messages, methods=["GET"]),
        Route(f"{p}/conversations/{{id:int}}/send", send_to_conversation, methods=["POST"]),
        Route(f"{p}/messages", send_to_number, methods=["POST"]),
        Route(f"{p}/messages/{{conversation_id:int}}", messages_by_cursor, methods=["GET"]),
        Route(f"{p}/messages/{{conversation_id:int}}", send_to_conversation, methods=["POST"]),
        Route(f"{p}/messages/{{conversation_id:int}}/paginated", messages_paginated, methods=["GET"]),
    ]
