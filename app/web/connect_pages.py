"""Connecting an org: the scope-consent screen, the OAuth callback, PATs, disconnect."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response

from app.connections import authorize, pat, policy, scopes, store, transitions
from app.core.errors import AppError
from app.deps import RequestIdDep, RuntimeDep, SessionDep
from app.web.viewer import ViewerDep, csrf_protect, redirect, render, tenant_for

router = APIRouter(dependencies=[Depends(csrf_protect)], include_in_schema=False)


def _consent_context(tenant, runtime, selected: list[str] | None = None) -> dict:
    """What the consent screen offers: Salesmsg's scope table (plus the unlisted PHI scopes when
    ``SMC_OFFER_UNLISTED_PHI_SCOPES`` is on), the offered defaults preselected."""
    unlisted = runtime.settings.offer_unlisted_phi_scopes
    defaults = policy.offered_defaults(runtime.settings.default_scopes, offer_unlisted=unlisted)
    offered = scopes.offered(unlisted=unlisted)
    phi_locked = not policy.tenant_phi_allowed(tenant)
    chosen = [s for s in selected if s in offered] if selected is not None else defaults
    if phi_locked:
        chosen = [s for s in chosen if not scopes.is_phi(s)]
    return {
        "tenant": tenant,
        "groups": scopes.grouped(unlisted=unlisted),
        "selected": set(chosen),
        "defaults": set(defaults),
        "phi_locked": phi_locked,
    }


@router.get("/t/{slug}/connect")
async def consent_page(request: Request, slug: str, session: SessionDep, runtime: RuntimeDep, viewer: ViewerDep) -> Response:
    tenant = await tenant_for(session, viewer, slug, connect=True)
    conn = await store.get_connection(session, tenant.id)
    return render(request, viewer, "consent.html", connection=conn, **_consent_context(tenant, runtime))


@router.post("/t/{slug}/connect")
async def consent_submit(
    request: Request, slug: str, session: SessionDep, runtime: RuntimeDep, viewer: ViewerDep, request_id: RequestIdDep
) -> Response:
    """Re-validate every submitted scope against the database's BAA state, then go to Salesmsg."""
    tenant = await tenant_for(session, viewer, slug, connect=True)
    assert viewer.web_session is not None  # tenant_for answered LoginRequired otherwise
    form = await request.form()
    requested = [value for value in form.getlist("scope") if isinstance(value, str)][:200]
    try:
        url = await authorize.start_authorization(
            session, settings=runtime.settings, data_keys=runtime.data_keys, tenant=tenant,
            web_session=viewer.web_session, requested=requested, actor=viewer.actor(), request_id=request_id,
        )
    except AppError as exc:
        conn = await store.get_connection(session, tenant.id)
        return render(
            request, viewer, "consent.html", status_code=exc.status_code, error=exc.message, error_code=exc.code,
            connection=conn, **_consent_context(tenant, runtime, requested),
        )
    return redirect(url)


@router.get("/oauth/callback")
async def oauth_callback(request: Request, session: SessionDep, runtime: RuntimeDep, viewer: ViewerDep, request_id: RequestIdDep) -> Response:
    params = {k: v for k, v in request.query_params.items() if k in ("state", "code", "error", "error_description")}
    result = await authorize.complete_authorization(
        session, settings=runtime.settings, http=runtime.http, data_keys=runtime.data_keys, web_session=viewer.web_session, params=params, actor=viewer.actor(), request_id=request_id,
    )
    return redirect(f"/t/{result.tenant.slug}/connected")


@router.get("/t/{slug}/connected")
async def connected_page(request: Request, slug: str, session: SessionDep, viewer: ViewerDep) -> Response:
    tenant = await tenant_for(session, viewer, slug, connect=True)
    conn = await store.get_connection(session, tenant.id)
    return render(request, viewer, "connected.html", tenant=tenant, connection=conn,
                  granted=scopes.parse(conn.scopes) if conn else [])


@router.post("/t/{slug}/connect/pat")
async def connect_pat(
    request: Request,
    slug: str,
    session: SessionDep,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
    token: Annotated[str, Form(max_length=4096)] = "",
) -> Response:
    tenant = await tenant_for(session, viewer, slug, connect=True)
    form = await request.form()
    granted = [value for value in form.getlist("scope") if isinstance(value, str)][:200]
    try:
        await pat.connect_with_pat(session, settings=runtime.settings, http=runtime.http, data_keys=runtime.data_keys,
                                   tenant=tenant, token=token, granted=granted,
                                       actor=viewer.actor(), request_id=request_id)
    except AppError as exc:
        conn = await store.get_connection(session, tenant.id)
        return render(request, viewer, "consent.html", status_code=exc.status_code, pat_error=exc.message,
                      connection=conn, **_consent_context(tenant, runtime))
    return redirect(f"/t/{tenant.slug}/connected")


@router.post("/t/{slug}/disconnect")
async def disconnect(slug: str, session: SessionDep, viewer: ViewerDep, request_id: RequestIdDep) -> Response:
    tenant = await tenant_for(session, viewer, slug)
    await transitions.disconnected(session, tenant=tenant, actor=viewer.actor(), request_id=request_id)
    return redirect(f"/t/{tenant.slug}?notice=disconnected")
