"""A connected org's inbox for the dashboard: conversations, messages, contacts, and sending.

Everything goes through the same gate (``connections.policy``) and upstream call as the REST proxy:
scopes, the BAA rule, fresh tokens, retries of reads only, and the same idempotency records for
sends. Every PHI view or send is audited, allowed or denied, in the request's transaction.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import audit_log
from app.audit.audit_log import Actor
from app.connections import policy, scopes
from app.connections.store import get_connection
from app.connections.view import TenantAccess
from app.core.errors import AppError, NotFound, Refusal
from app.core.models import Tenant
from app.proxy.endpoint_scopes import resolve
from app.proxy.idempotency import Idempotency, fingerprint
from app.proxy.upstream import Answer, Upstream
from app.vault.envelope import DataKeyCache
from app.vault.tenant_keys import load_data_key

FILTERS = ("open", "closed", "unread", "assigned", "unassigned")
PAGE_SIZE = 20
MAX_MESSAGE = 1600


class InboxError(AppError):
    """Salesmsg answered with an error, or could not be reached; shown as a banner."""


@dataclass(kw_only=True)
class Inbox:
    """One tenant's inbox, for one request of the dashboard."""

    upstream: Upstream
    idempotency: Idempotency
    data_keys: DataKeyCache
    session: AsyncSession
    tenant: Tenant
    actor: Actor
    request_id: str = ""
    # the PHI calls of the page view in progress (``page_view``), audited together when it ends
    _view: list[dict[str, Any]] | None = field(default=None, init=False, repr=False)

    async def access(self) -> TenantAccess:
        return TenantAccess.of(self.tenant, await get_connection(self.session, self.tenant.id))

    async def _audit(self, endpoint_scope: str, target: str, outcome: str, details: dict[str, Any]) -> None:
        if not scopes.is_phi(endpoint_scope):
            return
        if self._view is not None:
            self._view.append({"call": target, "scope": endpoint_scope, "outcome": outcome, **details})
            return
        await self.record_view(target, outcome, {"scope": endpoint_scope, **details})

    async def record_view(self, target: str, outcome: str, details: dict[str, Any]) -> None:
        """The ``dashboard.phi_access`` audit event of one view or send (also of a page refused
        before it asked Salesmsg anything)."""
        await audit_log.record(
            self.session, "dashboard.phi_access", self.actor, outcome=outcome, tenant_id=self.tenant.id,
            target=target, request_id=self.request_id or None, details=details,
        )

    @asynccontextmanager
    async def page_view(self, target: str) -> AsyncIterator[None]:
        """One page that makes several PHI calls (a thread: the conversation and its messages;
        contacts: the listing and its fallback) is one audit event: ``target`` is the page, the
        outcome the worst of its calls (denied, then failure), and ``calls`` lists each call with
        its scope and status. Written when the view ends, also when a call raised; a view with
        no PHI call writes nothing."""
        if self._view is not None:  # already inside a view: its calls join the outer one
            yield
            return
        self._view = []
        try:
            yield
        finally:
            calls, self._view = self._view, None
            if calls:
                outcomes = {c.pop("outcome") for c in calls}
                outcome = next((o for o in ("denied", "failure") if o in outcomes), "success")
                details: dict[str, Any] = {"scope": sorted({c["scope"] for c in calls}), "calls": calls}
                if len(calls) == 1:  # the same shape as a single call's record
                    details = {k: v for k, v in calls[0].items() if k != "call"}
                await self.record_view(target, outcome, details)

    async def _call(self, method: str, path: str, *, params: dict[str, Any] | None = None, body: bytes = b"",
                    idempotency_key: str | None = None, access: TenantAccess | None = None) -> Any:
        endpoint = resolve(method, path)
        if endpoint is None:  # pragma: no cover - our own paths are all mapped
            raise NotFound("Unknown Salesmsg endpoint.", code="unknown_endpoint")
        target = f"{method} {endpoint.template}"
        access = access or await self.access()
        try:
            policy.decide(access, endpoint.scope)
        except Refusal as refusal:
            await self._audit(endpoint.scope, target, "denied", {"decision": refusal.code})
            raise
        assert access.connection is not None  # the gate refuses a missing connection
        conn = access.connection
        key = await load_data_key(self.session, self.data_keys, self.tenant.id)
        query = urlencode({k: v for k, v in (params or {}).items() if v not in (None, "")}).encode()
        headers = {"Accept": "application/json"}
        if body:
            headers["Content-Type"] = "application/json"

        async def send() -> Answer:
            return await self.upstream.call(
                conn, key, method=method, path=path, query=query, body=body, headers=headers, request_id=self.request_id,
                caller=f"dashboard:{self.actor.type}:{self.actor.id}",
            )

        if idempotency_key is not None:
            answer, _ = await self.idempotency.once(
                tenant_id=self.tenant.id, key=f"dashboard:{idempotency_key}", fp=fingerprint(method, path, query, body),
                data_key=key, call=send,
            )
        else:
            answer = await send()
        await self._audit(endpoint.scope, target, "success" if answer.status < 400 else "failure", {"status": answer.status})
        if answer.status >= 400:
            raise _error_for(answer)
        try:
            return json.loads(answer.body) if answer.body else None
        except ValueError:
            raise InboxError("Salesmsg sent an answer we could not read.", code="upstream_malformed", status_code=502) from None

    # -- what the pages ask for ---------------------------------------------------------------

    async def conversations(self, *, filter: str, query: str, page: int) -> list[dict[str, Any]]:
        params = {"filter": filter, "limit": PAGE_SIZE + 1, "offset": (page - 1) * PAGE_SIZE, "query": query or None}
        data = await self._call("GET", "conversations", params=params)
        return [c for c in data if isinstance(c, dict)] if isinstance(data, list) else []

    async def conversation(self, conversation_id: int) -> dict[str, Any]:
        data = await self._call("GET", f"conversations/{conversation_id}")
        if not isinstance(data, dict):
            raise InboxError("Salesmsg sent an answer we could not read.", code="upstream_malformed", status_code=502)
        return data

    async def messages(self, conversation_id: int, *, limit: int = 50) -> list[dict[str, Any]]:
        data = await self._call("GET", f"conversations/{conversation_id}/messages", params={"limit": limit})
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        messages = [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []
        return sorted(messages, key=lambda m: (str(m.get("created_at") or ""), m.get("id") or 0))

    async def send(self, conversation_id: int, *, text: str, idempotency_key: str) -> dict[str, Any]:
        body = json.dumps({"message": text}, separators=(",", ":")).encode()
        data = await self._call("POST", f"conversations/{conversation_id}/send", body=body, idempotency_key=idempotency_key)
        return data if isinstance(data, dict) else {}

    async def contacts(self, *, search: str, page: int) -> tuple[list[dict[str, Any]], int | None]:
        """A page of contacts from ``POST /contacts/list`` (JSON body). Public v2.3 clients tag that
        endpoint ``contacts:write``, so a grant without it is listed by the deprecated
        ``GET /contacts`` (``contacts:read``) at once, not after a refused call that spends
        Salesmsg's budget; a listing Salesmsg refuses anyway (403 ``insufficient_scope``) falls
        back the same way."""
        fields = {"page": page, "length": PAGE_SIZE, **({"search": search} if search else {})}
        access = await self.access()
        if access.connection is None or "contacts:write" not in scopes.parse(access.connection.scopes):
            data = await self._call("GET", "contacts", params=fields, access=access)
        else:
            try:
                data = await self._call("POST", "contacts/list", body=json.dumps(fields, separators=(",", ":")).encode(),
                                        access=access)
            except InboxError as exc:
                if exc.code != "upstream_scope_refused":
                    raise
                data = await self._call("GET", "contacts", params=fields, access=access)
        rows = data.get("data") if isinstance(data, dict) else data
        meta = data.get("meta") if isinstance(data, dict) else None
        last = meta.get("last_page") if isinstance(meta, dict) and isinstance(meta.get("last_page"), int) else None
        return ([r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []), last


def _error_for(answer: Answer) -> InboxError:
    if answer.status in (502, 503, 504) or answer.status >= 500:
        return InboxError("Salesmsg is not answering right now. Try again in a moment.", code="upstream_unavailable",
                          status_code=502)
    if answer.status == 429:
        return InboxError("Salesmsg is limiting requests for this organization. Wait a minute and try again.",
                          code="upstream_rate_limited", status_code=429)
    if answer.status == 404:
        return InboxError("Salesmsg has no such item in this organization.", code="upstream_not_found", status_code=404)
    if answer.status == 422:
        return InboxError("Salesmsg did not accept this: " + _message_of(answer), code="upstream_rejected", status_code=422)
    if answer.status == 403 and _body_of(answer).get("error") == "insufficient_scope":
        return InboxError("Salesmsg says the connection was not granted what this page needs.",
                          code="upstream_scope_refused", status_code=403)
    if answer.status in (401, 403):
        return InboxError("Salesmsg refused this call for the organization's connection.", code="upstream_refused",
                          status_code=403)
    return InboxError("Salesmsg refused the request.", code="upstream_error", status_code=502)


def _body_of(answer: Answer) -> dict[str, Any]:
    try:
        body = json.loads(answer.body) if len(answer.body) < 65536 else None
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _message_of(answer: Answer) -> str:
    body = _body_of(answer)
    message = body.get("message") or body.get("error")
    if isinstance(message, str):
        return message[:200]
    return "the message was refused"


# -- who sent a message ---------------------------------------------------------------------

_OUTBOUND_TIMES = ("queued_at", "sent_at", "delivered_at", "failed_at")


@dataclass(frozen=True, slots=True)
class ThreadMessage:
    """One message of a thread as the page shows it: which side, and who sent it."""

    body: str
    created_at: str
    status: str | None
    failed_reason: str | None
    outbound: bool
    sender: str
    automated: bool


def _name_of(person: Any) -> str | None:
    if not isinstance(person, dict):
        return None
    full = person.get("full_name")
    if isinstance(full, str) and full.strip():
        return full.strip()
    parts = [p.strip() for p in (person.get("first_name"), person.get("last_name")) if isinstance(p, str) and p.strip()]
    return " ".join(parts) or None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def thread_message(message: dict[str, Any], contact: Any = None) -> ThreadMessage:
    """Which side a message is on and who sent it, from the fields Salesmsg sends (messages carry
    no ``direction``): outbound when it names the member who sent it (``user_id``/``user``), is
    ``automated``, or carries a queued, sent, delivered or failed time; inbound otherwise. An
    outbound message shows the member's name (``user.full_name``, else first and last name),
    "Automated" for an automation that names no member, "Team member" when only the id is known;
    an inbound one the contact's name (the conversation's ``contact``, else the message's), else
    "Contact"."""
    user = message.get("user")
    automated = message.get("automated") is True
    outbound = (message.get("user_id") is not None or isinstance(user, dict) or automated
                or any(message.get(t) for t in _OUTBOUND_TIMES))
    if outbound:
        sender = _name_of(user) or ("Automated" if automated else "Team member")
    else:
        sender = _name_of(contact) or _name_of(message.get("contact")) or "Contact"
    return ThreadMessage(
        body=_text(message.get("body")) or "", created_at=_text(message.get("created_at")) or "",
        status=_text(message.get("status")), failed_reason=_text(message.get("failed_reason")),
        outbound=outbound, sender=sender, automated=automated,
    )


def new_form_key() -> str:
    """One idempotency key per rendered send form: a double submit sends once."""
    return uuid.uuid4().hex
