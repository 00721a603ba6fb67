"""The connected org's conversations, a conversation thread with a send form, and contacts.

The org admin sees only their own tenant; operators see any tenant. A tenant with no connection
shows one "not connected" state and a HIPAA tenant without a BAA a locked state, with no data and
no call to Salesmsg; Salesmsg being down shows a banner, never a 500. Each page view is one audit
event (``Inbox.page_view``), however many PHI calls it makes.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Path, Query, Request
from fastapi.responses import Response

from app.connections import policy, scopes
from app.connections.store import get_connection
from app.connections.view import DISCONNECTED, TenantAccess
from app.core.errors import AppError
from app.deps import RequestIdDep, RuntimeDep, SessionDep
from app.proxy.inbox import (
    FILTERS,
    MAX_MESSAGE,
    PAGE_SIZE,
    Inbox,
    ThreadMessage,
    new_form_key,
    thread_message,
)
from app.web.viewer import ViewerDep, csrf_protect, redirect, render, tenant_for

router = APIRouter(dependencies=[Depends(csrf_protect)], include_in_schema=False)
ConversationId = Annotated[int, Path(ge=1, le=2**53)]



def _problem(exc: AppError) -> dict[str, Any]:
    """What the banner says for an error, and which call to action goes with it."""
    action = None
    if exc.code in ("connection_needs_reauth", "not_connected"):
        action = "reconnect"
    elif exc.code in ("insufficient_scope", "upstream_scope_refused"):
        action = "reconnect"
    return {"code": exc.code, "message": exc.message, "action": action}


async def _setup(request: Request, session, runtime, viewer, slug: str, request_id: str):
    tenant = await tenant_for(session, viewer, slug)
    conn = await get_connection(session, tenant.id)
    inbox = Inbox(upstream=runtime.upstream, idempotency=runtime.idempotency, data_keys=runtime.data_keys,
                  session=session, tenant=tenant, actor=viewer.actor(), request_id=request_id)
    locked = policy.phi_blocked(TenantAccess.of(tenant, conn))
    unconnected = conn is None or conn.status == DISCONNECTED or conn.access_token_ct is None
    context: dict[str, Any] = {"tenant": tenant, "connection": conn, "problem": None, "locked": locked,
                               "unconnected": unconnected}
    return inbox, context


async def _refused(inbox: Inbox, context: dict[str, Any], target: str) -> bool:
    """A page that cannot show anything (no connection, or PHI locked for want of a BAA) asks
    Salesmsg nothing; the refused view is audited like any other denial. True when refused."""
    decision = "not_connected" if context["unconnected"] else "baa_required" if context["locked"] else None
    if decision is None:
        return False
    await inbox.record_view(target, "denied", {"decision": decision})
    return True


@router.get("/t/{slug}/conversations")
async def conversations_page(
    request: Request,
    slug: str,
    session: SessionDep,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
    filter: Annotated[str, Query(pattern="^(open|closed|unread|assigned|unassigned)$")] = "open",
    q: Annotated[str, Query(max_length=100)] = "",
    page: Annotated[int, Query(ge=1, le=1000)] = 1,
) -> Response:
    inbox, context = await _setup(request, session, runtime, viewer, slug, request_id)
    rows: list[dict[str, Any]] = []
    if not await _refused(inbox, context, "GET /conversations"):
        try:
            async with inbox.page_view("GET /conversations"):
                rows = await inbox.conversations(filter=filter, query=q.strip(), page=page)
        except AppError as exc:
            context["problem"] = _problem(exc)
    return render(request, viewer, "conversations.html", rows=rows[:PAGE_SIZE], has_next=len(rows) > PAGE_SIZE,
                  filter=filter, filters=FILTERS, q=q, page=page, **context)


@router.get("/t/{slug}/conversations/{conversation_id}")
async def conversation_page(
    request: Request,
    slug: str,
    conversation_id: ConversationId,
    session: SessionDep,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
) -> Response:
    inbox, context = await _setup(request, session, runtime, viewer, slug, request_id)
    return await _render_conversation(request, viewer, inbox, context, conversation_id)


async def _render_conversation(request, viewer, inbox: Inbox, context: dict[str, Any], conversation_id: int,
                               *, status_code: int = 200, draft: str = "", send_error: str | None = None) -> Response:
    conversation: dict[str, Any] | None = None
    messages: list[ThreadMessage] = []
    refused = context.pop("refused_already", False) or await _refused(inbox, context, "GET /conversations/{id}")
    if not refused:
        try:
            # the conversation and its messages are one page view: one audit event
            async with inbox.page_view("GET /conversations/{id}"):
                conversation = await inbox.conversation(conversation_id)
                messages = [thread_message(m, conversation.get("contact")) for m in await inbox.messages(conversation_id)]
        except AppError as exc:
            context["problem"] = _problem(exc)
    conn = context["connection"]
    can_send = (bool(conn and "messages:write" in scopes.parse(conn.scopes)) and not context["locked"]
                and not context["unconnected"])
    notice = "Message sent." if request.query_params.get("notice") == "sent" else None
    return render(request, viewer, "conversation.html", status_code=status_code, conversation=conversation,
                  conversation_id=conversation_id, messages=messages, can_send=can_send, form_key=new_form_key(),
                  max_message=MAX_MESSAGE, draft=draft, send_error=send_error, notice=notice, **context)


@router.post("/t/{slug}/conversations/{conversation_id}/send")
async def send_message(
    request: Request,
    slug: str,
    conversation_id: ConversationId,
    session: SessionDep,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
    message: Annotated[str, Form(max_length=MAX_MESSAGE * 4)] = "",
    idempotency_key: Annotated[str, Form(pattern="^[0-9a-f]{32}$")] = "",
) -> Response:
    inbox, context = await _setup(request, session, runtime, viewer, slug, request_id)
    text = message.replace("\r\n", "\n").strip()
    if not text or len(text) > MAX_MESSAGE:
        problem = "Write a message first." if not text else f"A message is at most {MAX_MESSAGE} characters."
        return await _render_conversation(request, viewer, inbox, context, conversation_id, status_code=422,
                                          draft=message[: MAX_MESSAGE * 4], send_error=problem)
    if context["locked"] or context["unconnected"]:
        await _refused(inbox, context, "POST /conversations/{id}/send")
        context["refused_already"] = True
        return await _render_conversation(request, viewer, inbox, context, conversation_id,
                                          status_code=409 if context["unconnected"] else 403, draft=text)
    try:
        await inbox.send(conversation_id, text=text, idempotency_key=idempotency_key)
    except AppError as exc:
        # Nothing the user wrote is lost: the form comes back with the text in it.
        return await _render_conversation(request, viewer, inbox, context, conversation_id,
                                          status_code=exc.status_code if exc.status_code < 500 else 502,
                                          draft=text, send_error=exc.message)
    return redirect(f"/t/{inbox.tenant.slug}/conversations/{conversation_id}?notice=sent#latest")


@router.get("/t/{slug}/contacts")
async def contacts_page(
    request: Request,
    slug: str,
    session: SessionDep,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
    search: Annotated[str, Query(max_length=100)] = "",
    page: Annotated[int, Query(ge=1, le=1000)] = 1,
) -> Response:
    inbox, context = await _setup(request, session, runtime, viewer, slug, request_id)
    rows: list[dict[str, Any]] = []
    last_page = None
    if not await _refused(inbox, context, "GET /contacts"):
        try:
            async with inbox.page_view("GET /contacts"):
                rows, last_page = await inbox.contacts(search=search.strip(), page=page)
        except AppError as exc:
            context["problem"] = _problem(exc)
    return render(request, viewer, "contacts.html", rows=rows, search=search, page=page,
                  has_next=last_page is not None and page < last_page, **context)
