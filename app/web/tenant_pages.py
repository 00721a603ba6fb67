"""Operator and org admin pages: the tenant list, a tenant's page (connection, BAA, HIPAA flag)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import Response
from sqlalchemy import select

from app.connections import events, policy, scopes, store
from app.connections.view import DISCONNECTED, ConnectionView
from app.core.errors import AppError, ValidationFailed
from app.core.models import AuditEntry, Tenant
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
}


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
                  notice=NOTICES.get(request.query_params.get("notice", "")))


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


async def tenant_context(session, runtime, tenant: Tenant, viewer) -> dict[str, Any]:
    conn = await store.get_connection(session, tenant.id)
    granted = scopes.parse(conn.scopes) if conn else []
    context: dict[str, Any] = {
        "tenant": tenant,
        "connection": conn,
        "granted": granted,
        "usable": set(policy.usable_scopes(conn.scopes, tenant=tenant, kind=conn.kind)) if conn else set(),
        "phi_scopes": scopes.PHI_SCOPES,
        "events": await events.recent(session, tenant_id=tenant.id, limit=10),
        "budget": await runtime.upstream.budget.state(ConnectionView.of(conn)) if conn and conn.status != DISCONNECTED else None,
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
async def tenant_page(request: Request, slug: str, session: SessionDep, runtime: RuntimeDep, viewer: ViewerDep) -> Response:
    tenant = await tenant_for(session, viewer, slug)
    context = await tenant_context(session, runtime, tenant, viewer)
    return render(request, viewer, "tenant.html", notice=NOTICES.get(request.query_params.get("notice", "")), **context)


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
