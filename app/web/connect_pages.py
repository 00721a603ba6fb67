"""Connecting an org: the scope-consent screen, the OAuth callback, PATs, disconnect."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response
from sqlalchemy.exc import IntegrityError

from app.connections import authorize, links, pat, policy, scopes, store, transitions
from app.core.errors import AppError
from app.core.models import ConnectLink
from app.deps import RequestIdDep, RuntimeDep, SessionDep
from app.web.viewer import Viewer, ViewerDep, csrf_protect, redirect, render, tenant_for

router = APIRouter(dependencies=[Depends(csrf_protect)], include_in_schema=False)


@dataclass(frozen=True, slots=True)
class Choice:
    """One scope on the consent screen: ticked, or locked (PHI while the BAA is missing)."""

    scope: scopes.Scope
    checked: bool
    locked: bool


@dataclass(frozen=True, slots=True)
class Fold:
    """A resource's scopes beyond the minimum, folded under one disclosure."""

    group: scopes.ResourceGroup
    choices: list[Choice]
    open: bool  # it holds a scope the last submission was refused for

    @property
    def selected(self) -> int:
        return sum(1 for c in self.choices if c.checked)

    @property
    def locked(self) -> bool:
        return all(c.locked for c in self.choices)


def _consent_context(tenant, runtime, selected: list[str] | None = None, refused: list[str] | None = None) -> dict:
    """What the consent screen offers: Salesmsg's scope table (plus the unlisted PHI scopes when
    ``SMC_OFFER_UNLISTED_PHI_SCOPES`` is on). The offered defaults come first, preselected (the
    integration's minimum); the rest is folded by resource, a fold open when it holds a scope of
    ``refused`` (the error being shown). PHI scopes are locked while the tenant may not hold PHI.
    What is shown locked or ticked is only a hint: the POST re-checks everything (``policy``)."""
    settings = runtime.settings
    unlisted = settings.offer_unlisted_phi_scopes
    defaults = policy.offered_defaults(settings.default_scopes, offer_unlisted=unlisted)
    offered = scopes.offered(unlisted=unlisted)
    phi_locked = not policy.tenant_phi_allowed(tenant)
    chosen = [s for s in selected if s in offered] if selected is not None else defaults
    if phi_locked:
        chosen = [s for s in chosen if not scopes.is_phi(s)]
    picked, wanted, attention = set(chosen), set(defaults), set(refused or ())

    def choice(scope: scopes.Scope) -> Choice:
        locked = phi_locked and scope.phi
        return Choice(scope, checked=scope.name in picked and not locked, locked=locked)

    groups = scopes.grouped(unlisted=unlisted)
    folds = []
    for group in groups:
        rest = [choice(s) for s in group.scopes if s.name not in wanted]
        if rest:
            folds.append(Fold(group, rest, open=any(c.scope.name in attention for c in rest)))
    return {
        "tenant": tenant,
        "integration_name": settings.integration_name,
        "integration_purpose": settings.integration_purpose,
        "minimum": [choice(scopes.CATALOGUE[name]) for name in defaults],
        "folds": folds,
        "groups": groups,
        "selected": picked,
        "defaults": wanted,
        "phi_locked": phi_locked,
    }


async def _link_sender(session, viewer: Viewer) -> str | None:
    """Who sent the connect link this browser came through (its creator), for "who is asking"."""
    web_session = viewer.web_session
    if viewer.user is not None or web_session is None or web_session.link_id is None:
        return None
    link = await session.get(ConnectLink, web_session.link_id)
    return link.created_by if link is not None else None


@router.get("/t/{slug}/connect")
async def consent_page(request: Request, slug: str, session: SessionDep, runtime: RuntimeDep, viewer: ViewerDep) -> Response:
    tenant = await tenant_for(session, viewer, slug, connect=True)
    conn = await store.get_connection(session, tenant.id)
    return render(request, viewer, "consent.html", connection=conn, link_sender=await _link_sender(session, viewer),
                  **_consent_context(tenant, runtime))


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
        refused = [s for s in exc.extra.get("scopes", ()) if isinstance(s, str)]
        return render(
            request, viewer, "consent.html", status_code=exc.status_code, error=exc.message, error_code=exc.code,
            connection=conn, link_sender=await _link_sender(session, viewer),
            **_consent_context(tenant, runtime, requested, refused),
        )
    return redirect(url)


@router.get("/oauth/callback")
async def oauth_callback(request: Request, session: SessionDep, runtime: RuntimeDep, viewer: ViewerDep, request_id: RequestIdDep) -> Response:
    params = {k: v for k, v in request.query_params.items() if k in ("state", "code", "error", "error_description")}
    # a link revoked, expired or used (by this browser too) completes nothing; the lock queues a spend in progress
    await links.check_session(session, viewer.web_session, lock=True)
    try:
        result = await authorize.complete_authorization(
            session, settings=runtime.settings, http=runtime.http, data_keys=runtime.data_keys, web_session=viewer.web_session, params=params, actor=viewer.actor(), request_id=request_id,
        )
    except IntegrityError:
        # Another browser of the same link wrote the tenant's first connection meanwhile (the state's
        # commit ends the lock above): once it committed, its link is spent, and that is the answer.
        await session.rollback()
        if viewer.web_session is not None:
            await session.refresh(viewer.web_session)  # the rollback expired it
            await links.check_session(session, viewer.web_session)
        raise
    await links.spend_for_session(session, viewer.web_session, request_id=request_id)  # refused: the connection rolls back
    return redirect(f"/t/{result.tenant.slug}/connected")


@router.get("/t/{slug}/connected")
async def connected_page(request: Request, slug: str, session: SessionDep, runtime: RuntimeDep, viewer: ViewerDep) -> Response:
    tenant = await tenant_for(session, viewer, slug, connect=True, finished=True)
    conn = await store.get_connection(session, tenant.id)
    granted = scopes.parse(conn.scopes) if conn else []
    return render(request, viewer, "connected.html", tenant=tenant, connection=conn, granted=granted,
                  granted_scopes=[scopes.CATALOGUE[s] for s in granted if s in scopes.CATALOGUE],
                  integration_name=runtime.settings.integration_name)


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
    await links.check_session(session, viewer.web_session, lock=True)  # PATs through one link queue: one connects
    form = await request.form()
    granted = [value for value in form.getlist("scope") if isinstance(value, str)][:200]
    try:
        await pat.connect_with_pat(session, settings=runtime.settings, http=runtime.http, data_keys=runtime.data_keys,
                                   tenant=tenant, token=token, granted=granted,
                                       actor=viewer.actor(), request_id=request_id)
    except AppError as exc:
        conn = await store.get_connection(session, tenant.id)
        return render(request, viewer, "consent.html", status_code=exc.status_code, pat_error=exc.message,
                      connection=conn, link_sender=await _link_sender(session, viewer), **_consent_context(tenant, runtime))
    await links.spend_for_session(session, viewer.web_session, request_id=request_id)  # refused: the connection rolls back
    return redirect(f"/t/{tenant.slug}/connected")


@router.post("/t/{slug}/disconnect")
async def disconnect(slug: str, session: SessionDep, viewer: ViewerDep, request_id: RequestIdDep) -> Response:
    tenant = await tenant_for(session, viewer, slug)
    await transitions.disconnected(session, tenant=tenant, actor=viewer.actor(), request_id=request_id)
    return redirect(f"/t/{tenant.slug}?notice=disconnected")
