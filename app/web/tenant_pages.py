"""Operator and org admin pages: the tenant list, a tenant's page (connection and who made it, the
Salesmsg org it reaches and its warnings, the event history, BAA and HIPAA flag, edit and delete).

Destructive actions confirm in the page (a disclosure with the real button and its consequence);
deleting a tenant also needs its slug typed, and the server checks what was typed.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import Response
from sqlalchemy import select

from app.audit.audit_log import ACTOR_API_KEY, ACTOR_LINK, ACTOR_SYSTEM, ACTOR_USER
from app.connections import events, policy, scopes, store, webhooks
from app.connections.view import DISCONNECTED, ConnectionView
from app.core.errors import AppError, ValidationFailed
from app.core.models import AuditEntry, Connection, ConnectionEvent, Tenant
from app.deps import RequestIdDep, RuntimeDep, SessionDep
from app.identity import api_keys
from app.tenants import baa, registry
from app.web.viewer import (
    ViewerDep,
    csrf_protect,
    operator_tenant,
    redirect,
    render,
    require_operator,
    require_user,
    tenant_for,
)

router = APIRouter(dependencies=[Depends(csrf_protect)], include_in_schema=False)

NOTICES = {
    "connected": "Connected to Salesmsg.",
    "disconnected": "Disconnected. The tokens were destroyed.",
    "baa_signed": "BAA recorded as signed. PHI scopes and endpoints are open for this tenant.",
    "baa_revoked": "BAA revoked. PHI scopes and endpoints are blocked from now on.",
    "hipaa_on": "HIPAA is on for this tenant.",
    "hipaa_off": "HIPAA is off for this tenant.",
    "created": "Tenant created.",
    "saved": "Tenant saved.",
}
TENANTS_NOTICES = {**NOTICES, "deleted": "Tenant deleted. Its tokens were shredded with its data key."}
EVENTS_PER_PAGE = 15


@router.get("/org")
async def org_home(session: SessionDep, viewer: ViewerDep) -> Response:
    if viewer.link_tenant_id is not None:
        tenant = await session.get(Tenant, viewer.link_tenant_id)
        return redirect(f"/t/{tenant.slug}/connect" if tenant else "/login")
    require_user(viewer)
    if viewer.is_operator or viewer.user is None or viewer.user.tenant_id is None:
        return redirect("/tenants")
    tenant = await session.get(Tenant, viewer.user.tenant_id)
    return redirect(f"/t/{tenant.slug}" if tenant else "/login")


@router.get("/tenants")
async def tenants_page(
    request: Request,
    session: SessionDep,
    viewer: ViewerDep,
    q: Annotated[str | None, Query(max_length=100)] = None,
    # the filter form submits an empty value for "Any", and the next-page link carries it on
    status: Annotated[str | None, Query(pattern="^(active|needs_reauth|not_connected)?$")] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    require_operator(viewer)
    q, status, cursor = q or None, status or None, cursor or None
    page = await registry.list_tenants(session, search=q, cursor=cursor, limit=25, status=status)
    total = await registry.count_tenants(session, search=q, status=status)
    return render(request, viewer, "tenants.html", page=page, q=q or "", status=status or "", total=total,
                  notice=TENANTS_NOTICES.get(request.query_params.get("notice", "")))


@router.post("/tenants")
async def create_tenant(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
    slug: Annotated[str, Form(max_length=63)] = "",
    name: Annotated[str, Form(max_length=200)] = "",
    hipaa: Annotated[str, Form(max_length=10)] = "on",
) -> Response:
    require_operator(viewer)
    try:
        tenant = await registry.create_tenant(
            session, keyring=runtime.keyring, slug=slug, name=name, hipaa=hipaa != "off",
            actor=viewer.actor(), request_id=request_id,
        )
    except AppError as exc:
        page = await registry.list_tenants(session, limit=25)
        total = await registry.count_tenants(session)
        return render(request, viewer, "tenants.html", status_code=exc.status_code, page=page, q="", status="",
                      total=total, create_error=exc.message, form={"slug": slug, "name": name, "hipaa": hipaa})
    return redirect(f"/t/{tenant.slug}?notice=created")


# -- how the page words a connection: who made it, its warnings, its history -----------------


async def _last_connect(session, tenant_id: uuid.UUID) -> AuditEntry | None:
    return await session.scalar(
        select(AuditEntry).where(AuditEntry.tenant_id == tenant_id, AuditEntry.action == "connection.connect",
                                 AuditEntry.outcome == "success").order_by(AuditEntry.id.desc()).limit(1)
    )


def connected_by_words(conn: Connection, entry: AuditEntry | None) -> str:
    """Who connected, in words: a person's email, or the connect link they came through (never a
    session id, which means nothing to a reader)."""
    actor_type = entry.actor_type if entry else None
    actor_id = entry.actor_id if entry else conn.connected_by
    if actor_type == ACTOR_LINK or (entry is None and actor_id and "@" not in actor_id and actor_id != ACTOR_SYSTEM):
        sender = (entry.details or {}).get("link_sent_by") if entry else None
        return f"the admin who opened a connect link sent by {sender}" if sender else "the admin who opened a connect link"
    if actor_type == ACTOR_API_KEY:
        return "an internal service (API key)"
    if actor_type in (ACTOR_SYSTEM, None) and actor_id in (ACTOR_SYSTEM, None):
        return "the system (no person signed in)"
    if actor_type in (ACTOR_USER, None) and actor_id:
        return actor_id
    return "someone we could not identify"


def _org(value: Any) -> str:
    if not isinstance(value, dict):
        return "an unknown org"
    name, ident = value.get("name"), value.get("id")
    if name and ident:
        return f"{name} (id {ident})"
    return str(name or (f"id {ident}" if ident else "an unknown org"))


_BY = {ACTOR_USER: "a signed-in person", ACTOR_LINK: "a connect link", ACTOR_API_KEY: "an API key", ACTOR_SYSTEM: "the system"}


def describe_event(event: ConnectionEvent, *, shared_with: list[str] | None = None) -> dict[str, str]:
    """One row of the history: what happened, its detail, and whether it is a warning.

    ``shared_with``: for an operator, the slugs of the tenants an ``org_shared`` event was about
    (from the audit row; the event itself only counts them)."""
    data = (event.payload or {}).get("data") or {}
    kind = event.type
    if kind == "connected":
        by = _BY.get(str(data.get("by")), "")
        how = "personal access token" if data.get("kind") == "pat" else "OAuth2"
        count = len(data.get("scopes") or [])
        detail = f"{how}, {count} scope{'s' if count != 1 else ''}" + (f", through {by}" if by else "")
        return {"title": "Reconnected" if data.get("reconnect") else "Connected", "detail": detail, "level": ""}
    if kind == "refreshed":
        detail = "a new access token" + (", and Salesmsg rotated the refresh token" if data.get("rotated") else "")
        return {"title": "Token refreshed", "detail": detail, "level": ""}
    if kind == "refresh_failed":
        failures = data.get("failures")
        detail = f"{data.get('reason') or 'unknown reason'}" + (f"; {failures} in a row" if failures else "")
        return {"title": "Refresh failed", "detail": detail, "level": "warn"}
    if kind == "needs_reauth":
        return {"title": "Needs reconnect", "detail": f"Salesmsg stopped accepting the grant ({data.get('reason') or 'unknown'})",
                "level": "bad"}
    if kind == "recovered":
        return {"title": "Refreshing works again", "detail": f"after {data.get('after_failures')} failed attempts", "level": ""}
    if kind == "disconnected":
        by = _BY.get(str(data.get("by")), "")
        return {"title": "Disconnected", "detail": "tokens destroyed" + (f", by {by}" if by else ""), "level": ""}
    if kind == "org_changed":
        return {"title": "Salesmsg org changed", "detail": f"from {_org(data.get('from'))} to {_org(data.get('to'))}",
                "level": "warn"}
    if kind == "org_shared":
        n_others = data.get("other_tenants")
        others = ", ".join(shared_with or []) or (
            f"{n_others} other tenants" if isinstance(n_others, int) and n_others > 1 else "another tenant")
        return {"title": "Salesmsg org shared", "detail": f"{_org(data.get('org'))} is also connected to {others}", "level": "warn"}
    return {"title": kind, "detail": "", "level": ""}


async def _shared_with(session, tenant_id: uuid.UUID, rows: list[ConnectionEvent]) -> dict[int, list[str]]:
    """For an operator: each ``org_shared`` event's other tenants, read from the audit row of the
    same connect (recorded just after the event, in the same transaction)."""
    shared = [e for e in rows if e.type == "org_shared"]
    if not shared:
        return {}
    connects = (
        await session.scalars(
            select(AuditEntry).where(
                AuditEntry.tenant_id == tenant_id, AuditEntry.action == "connection.connect",
                AuditEntry.at >= min(e.created_at for e in shared),
                AuditEntry.at <= max(e.created_at for e in shared) + timedelta(minutes=5),
            ).order_by(AuditEntry.at, AuditEntry.id)
        )
    ).all()
    found: dict[int, list[str]] = {}
    for event in shared:
        entry = next((a for a in connects if a.at >= event.created_at and (a.details or {}).get("org_shared")), None)
        if entry is not None:
            found[event.id] = [str(slug) for slug in entry.details["org_shared"]]
    return found


async def _org_warnings(session, tenant: Tenant, conn: Connection | None, *, operator: bool) -> dict[str, Any]:
    """The banner's facts. Only an operator learns which other tenants share the Salesmsg org; an
    org admin is told only that it is connected elsewhere."""
    if conn is None or conn.status == DISCONNECTED:
        return {"org_changed": None, "org_shared_with": [], "org_shared_elsewhere": False}
    changed = None
    for event in await events.warnings_since_connect(session, tenant_id=tenant.id):
        if event.type == "org_changed":
            data = (event.payload or {}).get("data") or {}
            changed = {"from": _org(data.get("from")), "to": _org(data.get("to")), "at": event.created_at}
    shared = await registry.tenants_holding_org(session, conn.salesmsg_org_id, besides=tenant.id) if conn.salesmsg_org_id else []
    return {"org_changed": changed, "org_shared_with": shared if operator else [], "org_shared_elsewhere": bool(shared)}


async def tenant_context(session, runtime, tenant: Tenant, viewer, *, events_before: int | None = None) -> dict[str, Any]:
    conn = await store.get_connection(session, tenant.id)
    granted = scopes.parse(conn.scopes) if conn else []
    history = await events.page(session, tenant_id=tenant.id, limit=EVENTS_PER_PAGE, before_id=events_before)
    shared_with = await _shared_with(session, tenant.id, history.rows) if viewer.is_operator else {}
    context: dict[str, Any] = {
        "tenant": tenant,
        "connection": conn,
        "granted": granted,
        "usable": set(policy.usable_scopes(conn.scopes, tenant=tenant, kind=conn.kind)) if conn else set(),
        "phi_scopes": scopes.PHI_SCOPES,
        "events": [(e, describe_event(e, shared_with=shared_with.get(e.id))) for e in history.rows],
        "events_older": history.next_before,
        "events_paged": events_before is not None,
        "connected_by": connected_by_words(conn, await _last_connect(session, tenant.id)) if conn and conn.connected_at else None,
        "budget": await runtime.upstream.budget.state(ConnectionView.of(conn)) if conn and conn.status != DISCONNECTED else None,
        **await _org_warnings(session, tenant, conn, operator=viewer.is_operator),
    }
    if viewer.is_operator:
        context["api_keys"] = await api_keys.keys_for_tenant(session, tenant.id)
        context["audit_entries"] = (
            await session.scalars(
                select(AuditEntry).where(AuditEntry.tenant_id == tenant.id).order_by(AuditEntry.id.desc()).limit(15)
            )
        ).all()
    return context


@router.get("/t/{slug}")
async def tenant_page(
    request: Request,
    slug: str,
    session: SessionDep,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    events_before: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
) -> Response:
    tenant = await tenant_for(session, viewer, slug)
    context = await tenant_context(session, runtime, tenant, viewer, events_before=events_before)
    return render(request, viewer, "tenant.html", notice=NOTICES.get(request.query_params.get("notice", "")), **context)


@router.post("/t/{slug}/edit")
async def edit_tenant(
    request: Request,
    slug: str,
    session: SessionDep,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
    name: Annotated[str, Form(max_length=200)] = "",
    webhook_url: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    """Rename and set or clear the webhook URL, as the API's PATCH does; a new webhook secret is
    shown once, on the page this answers with."""
    tenant = await operator_tenant(session, viewer, slug)
    secret = None
    try:
        registry.validate_name(name)  # both fields are checked before either changes
        webhook_url = webhook_url.strip()
        if webhook_url:
            webhooks.validate_url(webhook_url)
        await registry.rename(session, tenant, name=name, actor=viewer.actor(), request_id=request_id)
        if webhook_url != (tenant.webhook_url or ""):
            secret = await webhooks.set_webhook(session, runtime.data_keys, tenant, url=webhook_url or None,
                                                actor=viewer.actor(), request_id=request_id)
    except AppError as exc:
        context = await tenant_context(session, runtime, tenant, viewer)
        return render(request, viewer, "tenant.html", status_code=exc.status_code, edit_error=exc.message,
                      edit_form={"name": name, "webhook_url": webhook_url}, **context)
    if secret is None:
        return redirect(f"/t/{tenant.slug}?notice=saved")
    await session.flush()
    context = await tenant_context(session, runtime, tenant, viewer)
    return render(request, viewer, "tenant.html", notice=NOTICES["saved"], webhook_secret=secret, **context)


@router.post("/t/{slug}/delete")
async def delete_tenant(
    request: Request,
    slug: str,
    session: SessionDep,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
    confirm_slug: Annotated[str, Form(max_length=100)] = "",
) -> Response:
    """Delete the tenant once its slug is typed: its data key goes, so every token sealed under it is
    shredded (as the API's DELETE does)."""
    tenant = await operator_tenant(session, viewer, slug)
    try:
        registry.check_typed_confirmation(tenant, confirm_slug)
    except AppError as exc:
        context = await tenant_context(session, runtime, tenant, viewer)
        return render(request, viewer, "tenant.html", status_code=exc.status_code, delete_error=exc.message, **context)
    await registry.delete_tenant(session, tenant, actor=viewer.actor(), request_id=request_id)
    return redirect("/tenants?notice=deleted")


@router.post("/t/{slug}/baa")
async def sign_baa(
    request: Request,
    slug: str,
    session: SessionDep,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
    reference: Annotated[str, Form(max_length=200)] = "",
    note: Annotated[str, Form(max_length=2000)] = "",
    confirm: Annotated[str, Form(max_length=10)] = "",
) -> Response:
    tenant = await operator_tenant(session, viewer, slug)
    try:
        if confirm != "yes":
            raise ValidationFailed("Tick the box to confirm the BAA is signed.", code="confirmation_required")
        await baa.sign(session, tenant, reference=reference, note=note, signed_by=viewer.label,
                       actor=viewer.actor(), request_id=request_id)
    except AppError as exc:
        context = await tenant_context(session, runtime, tenant, viewer)
        return render(request, viewer, "tenant.html", status_code=exc.status_code, baa_error=exc.message, **context)
    return redirect(f"/t/{tenant.slug}?notice=baa_signed")


@router.post("/t/{slug}/baa/revoke")
async def revoke_baa(
    request: Request,
    slug: str,
    session: SessionDep,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
    reason: Annotated[str, Form(max_length=500)] = "",
    confirm: Annotated[str, Form(max_length=10)] = "",
) -> Response:
    tenant = await operator_tenant(session, viewer, slug)
    try:
        if confirm != "yes":
            raise ValidationFailed("Tick the box to confirm revoking the BAA.", code="confirmation_required")
        await baa.revoke(session, tenant, reason=reason, actor=viewer.actor(), request_id=request_id)
    except AppError as exc:
        context = await tenant_context(session, runtime, tenant, viewer)
        return render(request, viewer, "tenant.html", status_code=exc.status_code, baa_error=exc.message, **context)
    return redirect(f"/t/{tenant.slug}?notice=baa_revoked")


@router.post("/t/{slug}/hipaa")
async def set_hipaa(
    slug: str,
    session: SessionDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
    hipaa: Annotated[str, Form(pattern="^(on|off)$")] = "on",
) -> Response:
    tenant = await operator_tenant(session, viewer, slug)
    await registry.set_hipaa(session, tenant, hipaa=hipaa == "on", actor=viewer.actor(), request_id=request_id)
    return redirect(f"/t/{tenant.slug}?notice=hipaa_{hipaa}")
