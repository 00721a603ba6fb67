"""Contacts (list, search, create, read, update, delete, opt out/in) and tags (list, create,
attach to and detach from a contact)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

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
    page_param,
    read_input,
    text_errors,
)
from salesmsg_emulator.messaging import normalize_number
from salesmsg_emulator.payloads import contact_payload, tag_payload
from salesmsg_emulator.records import Contact, Tag

MAX_LENGTH = 100
DEFAULT_LENGTH = 20
SEARCH_LIMIT = 50  # GET /contacts/search without ``limit`` (a public v2.3 client names 50 the default)
MAX_TAG_LABEL = 50  # the v2.3 schema's bound (its prose says 15)
_TEXT_FIELDS = ("first_name", "last_name")
# fields ``sortBy`` may name (Salesmsg's list is not published: these are the records' own fields)
CONTACT_SORT_FIELDS = ("id", "first_name", "last_name", "email", "number", "created_at", "updated_at")
TAG_SORT_FIELDS = ("id", "name", "label", "created_at")

_R = TypeVar("_R", Contact, Tag)


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


def _sorted(rows: list[_R], fields: Mapping[str, Any], allowed: Sequence[str]) -> list[_R]:
    """``rows`` ordered by ``sortBy`` (one of ``allowed``; id when absent) and ``sortOrder`` (asc, desc);
    nulls last. 422 for another field or order."""
    sort_by = fields.get("sortBy") or "id"
    order = str(fields.get("sortOrder") or "asc").lower()
    errors: dict[str, list[str]] = {}
    if sort_by not in allowed:
        errors["sortBy"] = ["The selected sort by is invalid."]
    if order not in ("asc", "desc"):
        errors["sortOrder"] = ["The selected sort order is invalid."]
    if errors:
        raise invalid(errors)

    def key(row: _R) -> tuple[Any, int]:
        value = getattr(row, sort_by)
        return (value.lower() if isinstance(value, str) else value), row.id

    present = [r for r in rows if getattr(r, sort_by) is not None]
    absent = [r for r in rows if getattr(r, sort_by) is None]
    return sorted(present, key=key, reverse=order == "desc") + absent


def _paged(rows: list[Any], page: int, length: int, render: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """Laravel's page: ``{data, meta:{current_page,last_page,per_page,total}}``."""
    chunk = rows[(page - 1) * length : page * length]
    return {
        "data": [render(r) for r in chunk],
        "meta": {"current_page": page, "last_page": max(1, math.ceil(len(rows) / length)),
                 "per_page": length, "total": len(rows)},
    }  # fmt: skip


def _contact_matches(contact: Contact, search: str) -> bool:
    """Name, e-mail, or (3+ digits) number contains ``search`` (lower case)."""
    digits = "".join(ch for ch in search if ch.isdigit())
    return (
        not search
        or search in f"{contact.first_name or ''} {contact.last_name or ''}".lower()
        or search in (contact.email or "").lower()
        or (len(digits) >= 3 and digits in contact.number)
    )


def _contact_page(ctx: ApiContext, fields: Mapping[str, Any]) -> Response:
    page = page_param(fields.get("page"))
    length = int_param(fields.get("length") or fields.get("per_page"), "length", DEFAULT_LENGTH,
                       minimum=1, maximum=MAX_LENGTH)  # fmt: skip
    search = str(fields.get("search") or "").strip().lower()
    with ctx.store.read():
        rows = [c for c in ctx.store.org_contacts(ctx.org_id) if _contact_matches(c, search)]
        rows = _sorted(rows, fields, CONTACT_SORT_FIELDS)
        return JSONResponse(_paged(rows, page, length, lambda c: contact_payload(c, ctx.store)))


@api_endpoint("contacts:read")
async def list_contacts(ctx: ApiContext) -> Response:
    """``GET /contacts`` (deprecated in v2.3, still served)."""
    return _contact_page(ctx, ctx.request.query_params)


@api_endpoint(lambda settings: settings.contacts_list_scope)
async def contacts_list(ctx: ApiContext) -> Response:
    """``POST /contacts/list``: the same page; ``page``, ``length``, ``search``, ``sortBy``, ``sortOrder``
    as query parameters, a form or a JSON body."""
    return _contact_page(ctx, (await read_input(ctx.request)).fields)


@api_endpoint("contacts:read")
async def search_contacts(ctx: ApiContext) -> Response:
    """``GET /contacts/search?term=&limit=``: ``{"results": [...]}``."""
    params = ctx.request.query_params
    term = (params.get("term") or "").strip().lower()
    if not term:
        raise invalid({"term": ["The term field is required."]})
    limit = int_param(params.get("limit"), "limit", SEARCH_LIMIT, minimum=1, maximum=MAX_LENGTH)
    with ctx.store.read():
        rows = [c for c in ctx.store.org_contacts(ctx.org_id) if _contact_matches(c, term)][:limit]
        return JSONResponse({"results": [contact_payload(c, ctx.store) for c in rows]})


async def _set_opt_out(ctx: ApiContext, opt_out: bool) -> Response:
    with ctx.store.write():
        contact = _contact(ctx)
        _apply(contact, {"opt_out": opt_out}, ctx.now())
        return JSONResponse(contact_payload(contact, ctx.store))


@api_endpoint("contacts:write")
async def opt_out_contact(ctx: ApiContext) -> Response:
    return await _set_opt_out(ctx, True)


@api_endpoint("contacts:write")
async def opt_in_contact(ctx: ApiContext) -> Response:
    return await _set_opt_out(ctx, False)


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
    """``GET /tags?search=&page=&length=&sortBy=&sortOrder=``: ``{data, meta}``; ``search`` matches the label."""
    params = ctx.request.query_params
    page = page_param(params.get("page"))
    length = int_param(params.get("length"), "length", DEFAULT_LENGTH, minimum=1, maximum=MAX_LENGTH)
    search = (params.get("search") or "").strip().lower()
    with ctx.store.read():
        rows = [t for t in ctx.store.org_tags(ctx.org_id) if search in t.label.lower()]
        return JSONResponse(_paged(_sorted(rows, params, TAG_SORT_FIELDS), page, length, tag_payload))


@api_endpoint("tags:write")
async def create_tag(ctx: ApiContext) -> Response:
    """``POST /tags`` with ``label`` (query, form or JSON): 201, the tag (its ``name`` is the label)."""
    inputs = await read_input(ctx.request)
    label = inputs.get("label")
    if problems := text_errors(label, "label", required=True, max_length=MAX_TAG_LABEL):
        raise invalid({"label": problems})
    label = label.strip()
    with ctx.store.write():
        if any(t.label.lower() == label.lower() for t in ctx.store.org_tags(ctx.org_id)):
            raise invalid({"label": ["The label has already been taken."]})
        tag = Tag(id=ctx.store.next_id("tag"), org_id=ctx.org_id, name=label, label=label, created_at=ctx.now())
        ctx.store.tags[tag.id] = tag
        return JSONResponse(tag_payload(tag), 201)


def _contact_and_tag(ctx: ApiContext) -> tuple[Contact, Tag]:
    params = ctx.request.path_params
    contact = ctx.store.org_contact(ctx.org_id, int(params["contact"]))
    if contact is None:
        raise not_found("Contact")
    tag = ctx.store.tags.get(int(params["tag"]))
    if tag is None or tag.org_id != ctx.org_id:
        raise not_found("Tag")
    return contact, tag


@api_endpoint("tags:write")
async def attach_tag(ctx: ApiContext) -> Response:
    """``PUT /tags/contact/{contact}/{tag}``: ``{type, message}`` (idempotent)."""
    with ctx.store.write():
        contact, tag = _contact_and_tag(ctx)
        if tag.id not in contact.tag_ids:
            contact.tag_ids.append(tag.id)
            contact.updated_at = ctx.now()
        return JSONResponse({"type": "success", "message": "Tag added to contact."})


@api_endpoint("tags:write")
async def detach_tag(ctx: ApiContext) -> Response:
    """``DELETE /tags/contact/{contact}/{tag}``: ``{type, message}`` (idempotent)."""
    with ctx.store.write():
        contact, tag = _contact_and_tag(ctx)
        if tag.id in contact.tag_ids:
            contact.tag_ids.remove(tag.id)
            contact.updated_at = ctx.now()
        return JSONResponse({"type": "success", "message": "Tag removed from contact."})


def routes() -> list[Route]:
    p = API_PREFIX
    return [
        Route(f"{p}/contacts", list_contacts, methods=["GET"]),
        Route(f"{p}/contacts", create_contact, methods=["POST"]),
        Route(f"{p}/contacts/list", contacts_list, methods=["POST"]),
        Route(f"{p}/contacts/search", search_contacts, methods=["GET"]),
        Route(f"{p}/contacts/opt-out/{{id:int}}", opt_out_contact, methods=["PUT"]),
        Route(f"{p}/contacts/opt-in/{{id:int}}", opt_in_contact, methods=["PUT"]),
        Route(f"{p}/contacts/{{id:int}}", get_contact, methods=["GET"]),
        Route(f"{p}/contacts/{{id:int}}", update_contact, methods=["PUT", "PATCH"]),
        Route(f"{p}/contacts/{{id:int}}", delete_contact, methods=["DELETE"]),
        Route(f"{p}/tags", list_tags, methods=["GET"]),
        Route(f"{p}/tags", create_tag, methods=["POST"]),
        Route(f"{p}/tags/contact/{{contact:int}}/{{tag:int}}", attach_tag, methods=["PUT"]),
        Route(f"{p}/tags/contact/{{contact:int}}/{{tag:int}}", detach_tag, methods=["DELETE"]),
    ]
