"""Contacts (list, create, read, update, delete) and tags."""

from __future__ import annotations

import math
from typing import Any

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
    bool_param,
    email_errors,
    int_param,
    read_input,
    text_errors,
)
from salesmsg_emulator.messaging import normalize_number
from salesmsg_emulator.payloads import contact_payload, tag_payload
from salesmsg_emulator.records import Contact, Tag

MAX_LENGTH = 100
DEFAULT_LENGTH = 20
_TEXT_FIELDS = ("first_name", "last_name")


def _contact(ctx: ApiContext) -> Contact:
    contact = ctx.store.org_contact(ctx.org_id, int(ctx.request.path_params["id"]))
    if contact is None:
        raise not_found("Contact")
    return contact


def _validate(ctx: ApiContext, inputs: Inputs, *, creating: bool, current: Contact | None = None) -> dict[str, Any]:
    """The contact fields of ``inputs``, normalised; 422 with every field's errors otherwise."""
    errors: dict[str, list[str]] = {}
    values: dict[str, Any] = {}
    if creating or inputs.has("number"):
        raw = inputs.get("number")
        if raw in (None, ""):
            errors["number"] = ["The number field is required."]
        elif (number := normalize_number(str(raw))) is None:
            errors["number"] = ["The number format is invalid."]
        elif (other := ctx.store.contact_by_number(ctx.org_id, number)) is not None and other is not current:
            errors["number"] = ["The number has already been taken."]
        else:
            values["number"] = number
    for name in _TEXT_FIELDS:
        if inputs.has(name):
            if problems := text_errors(inputs.get(name), name, required=False, max_length=255):
                errors[name] = problems
            else:
                values[name] = (inputs.get(name) or "").strip() or None
    if inputs.has("email"):
        if problems := email_errors(inputs.get("email")):
            errors["email"] = problems
        else:
            values["email"] = inputs.get("email") or None
    for name in ("opt_out", "is_blocked"):
        if inputs.has(name):
            try:
                values[name] = bool_param(inputs.get(name), name)
            except ApiError as error:
                errors.update(error.payload["errors"])
    if errors:
        raise invalid(errors)
    return values


def _apply(contact: Contact, values: dict[str, Any], now: float) -> None:
    for name, value in values.items():
        if name == "opt_out" and value != contact.opt_out:
            contact.opt_out_at = now if value else None
        setattr(contact, name, value)
    contact.updated_at = now


@api_endpoint("contacts:read")
async def list_contacts(ctx: ApiContext) -> Response:
    params = ctx.request.query_params
    page = int_param(params.get("page"), "page", 1, minimum=1)
    length = int_param(params.get("length") or params.get("per_page"), "length", DEFAULT_LENGTH,
                       minimum=1, maximum=MAX_LENGTH)  # fmt: skip
    search = (params.get("search") or "").strip().lower()
    digits = "".join(ch for ch in search if ch.isdigit())
    with ctx.store.read():
        rows = [
            c for c in ctx.store.org_contacts(ctx.org_id)
            if not search
            or search in f"{c.first_name or ''} {c.last_name or ''}".lower()
            or search in (c.email or "").lower()
            or (len(digits) >= 3 and digits in c.number)
        ]  # fmt: skip
        chunk = rows[(page - 1) * length : page * length]
        return JSONResponse({
            "data": [contact_payload(c, ctx.store) for c in chunk],
            "meta": {"current_page": page, "last_page": max(1, math.ceil(len(rows) / length)),
                     "per_page": length, "total": len(rows)},
        })  # fmt: skip


@api_endpoint("contacts:write")
async def create_contact(ctx: ApiContext) -> Response:
    inputs = await read_input(ctx.request)
    with ctx.store.write():
        values = _validate(ctx, inputs, creating=True)
        now = ctx.now()
        contact = Contact(
            id=ctx.store.next_id("contact"), org_id=ctx.org_id, first_name=None, last_name=None, email=None,
            number=values["number"], country="US" if values["number"].startswith("+1") else "", opt_out=False,
            opt_out_at=None, is_blocked=False, created_at=now, updated_at=now,
        )  # fmt: skip
        _apply(contact, values, now)
        ctx.store.contacts[contact.id] = contact
        return JSONResponse(contact_payload(contact, ctx.store), 201)


@api_endpoint("contacts:read")
async def get_contact(ctx: ApiContext) -> Response:
    with ctx.store.read():
        return JSONResponse(contact_payload(_contact(ctx), ctx.store))


@api_endpoint("contacts:write")
async def update_contact(ctx: ApiContext) -> Response:
    inputs = await read_input(ctx.request)
    with ctx.store.write():
        contact = _contact(ctx)
        values = _validate(ctx, inputs, creating=False, current=contact)
        _apply(contact, values, ctx.now())
        return JSONResponse(contact_payload(contact, ctx.store))


@api_endpoint("contacts:write")
async def delete_contact(ctx: ApiContext) -> Response:
    with ctx.store.write():
        contact = _contact(ctx)
        ctx.store.delete_contact(contact)
        return JSONResponse({"message": "Contact deleted.", "id": contact.id})


@api_endpoint("tags:read")
async def list_tags(ctx: ApiContext) -> Response:
    params = ctx.request.query_params
    offset = int_param(params.get("offset"), "offset", 0)
    limit = int_param(params.get("limit"), "limit", MAX_LENGTH, minimum=1, maximum=MAX_LENGTH)
    with ctx.store.read():
        tags = ctx.store.org_tags(ctx.org_id)[offset : offset + limit]
        return JSONResponse([tag_payload(t) for t in tags])


@api_endpoint("tags:write")
async def create_tag(ctx: ApiContext) -> Response:
    inputs = await read_input(ctx.request)
    name = inputs.get("name")
    if problems := text_errors(name, "name", required=True, max_length=100):
        raise invalid({"name": problems})
    name = name.strip()
    with ctx.store.write():
        if any(t.name.lower() == name.lower() for t in ctx.store.org_tags(ctx.org_id)):
            raise invalid({"name": ["The name has already been taken."]})
        label = inputs.get("label") if isinstance(inputs.get("label"), str) and inputs.get("label") else name
        tag = Tag(id=ctx.store.next_id("tag"), org_id=ctx.org_id, name=name, label=label, created_at=ctx.now())
        ctx.store.tags[tag.id] = tag
        return JSONResponse(tag_payload(tag), 201)


def routes() -> list[Route]:
    p = API_PREFIX
    return [
        Route(f"{p}/contacts", list_contacts, methods=["GET"]),
        Route(f"{p}/contacts", create_contact, methods=["POST"]),
        Route(f"{p}/contacts/{{id:int}}", get_contact, methods=["GET"]),
        Route(f"{p}/contacts/{{id:int}}", update_contact, methods=["PUT", "PATCH"]),
        Route(f"{p}/contacts/{{id:int}}", delete_contact, methods=["DELETE"]),
        Route(f"{p}/tags", list_tags, methods=["GET"]),
        Route(f"{p}/tags", create_tag, methods=["POST"]),
    ]
