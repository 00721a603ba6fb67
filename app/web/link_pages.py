"""Connect links and invitations: the operator's list (create, revoke, re-issue), opening a connect
link, accepting an invitation.

Opening a link spends nothing (mail scanners and link previews open links before people do): a
connect link becomes a browser session bound to its tenant and to the link, and is spent when a
connection made through it completes (``connections.links.spend_for_session``); an invitation is
spent when it is accepted.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response

from app.connections import links
from app.core.errors import AppError
from app.core.models import Invitation, Tenant
from app.deps import RequestIdDep, RuntimeDep, SessionDep
from app.identity import invitations, sessions
from app.web.viewer import ViewerDep, csrf_protect, operator_tenant, redirect, render, require_operator, safe_next

router = APIRouter(dependencies=[Depends(csrf_protect)], include_in_schema=False)

NOTICES = {
    "link_revoked": "Connect link revoked. Browsers that opened it can no longer connect with it.",
    "invitation_revoked": "Invitation revoked. Its link no longer works.",
}
LINK_EXPLAIN = ("Send this link to the organization's admin. Opening it does not use it up (mail scanners and link "
                "previews open links too): it works until a connection is made through it, it expires, or you revoke it. "
                "It is shown only now.")
INVITATION_EXPLAIN = ("Send this link to {email}. It works once, to set a password, until it expires or you revoke it. "
                      "It is shown only now.")


def _refused(request: Request, viewer, exc: AppError) -> Response:
    """A link that no longer works: a page of its own that says why and what to do."""
    return render(request, viewer, "link_refused.html", status_code=exc.status_code, title=exc.title,
                  message=exc.message, hint=exc.hint, code=exc.code)


async def _links_context(session, runtime, tenant: Tenant) -> dict[str, Any]:
    now = datetime.now(UTC)
    link_rows = await links.list_links(session, tenant_id=tenant.id)
    invitation_rows = await invitations.outstanding(session, tenant_id=tenant.id, role="org_admin", include_closed=True)
    return {
        "tenant": tenant,
        "links": [(row, links.state_of(row, now=now)) for row in link_rows],
        "invitations": [(row, invitations.state_of(row, now=now)) for row in invitation_rows],
        "link_hours": runtime.settings.connect_link_hours,
        "invitation_hours": runtime.settings.invitation_hours,
    }


async def _links_page(request: Request, session, runtime, viewer, tenant: Tenant, *, status_code: int = 200,
                      **extra: Any) -> Response:
    context = await _links_context(session, runtime, tenant)
    return render(request, viewer, "links.html", status_code=status_code, **context, **extra)


def _link_shown(request: Request, viewer, runtime, tenant: Tenant, link, token: str, *, title: str) -> Response:
    return render(request, viewer, "shown_once.html", tenant=tenant, title=title,
                  url=f"{runtime.settings.public_url}/connect/{token}", expires_at=link.expires_at, explain=LINK_EXPLAIN,
                  back=f"/t/{tenant.slug}/links", back_label="Back to connect links and invitations")


def _invitation_shown(request: Request, viewer, runtime, tenant: Tenant | None, invitation: Invitation, token: str,
                      *, back: str) -> Response:
    return render(request, viewer, "shown_once.html", tenant=tenant, title=f"Invitation for {invitation.email}",
                  url=f"{runtime.settings.public_url}/invite/{token}", expires_at=invitation.expires_at,
                  explain=INVITATION_EXPLAIN.format(email=invitation.email), back=back,
                  back_label="Back to connect links and invitations" if tenant is not None else "Back")


@router.get("/connect/{token}")
async def open_connect_link(
    request: Request, token: str, session: SessionDep, runtime: RuntimeDep, viewer: ViewerDep, request_id: RequestIdDep
) -> Response:
    """Check the link, count the open, and start a browser session bound to its tenant and the link."""
    try:
        link, tenant = await links.open_connect_link(session, token, request_id=request_id)
    except AppError as exc:
        if exc.code not in links.REFUSALS:
            raise
        return _refused(request, viewer, exc)
    if viewer.signed_in and viewer.can_manage(tenant):
        return redirect(f"/t/{tenant.slug}/connect")
    session_token, _ = await sessions.start(session, runtime.settings, link_tenant_id=tenant.id, link_id=link.id,
                                            replaces=viewer.token)
    response = redirect(f"/t/{tenant.slug}/connect")
    sessions.set_session_cookie(response, runtime.settings, session_token)
    return response


@router.get("/t/{slug}/links")
async def links_page(request: Request, slug: str, session: SessionDep, runtime: RuntimeDep, viewer: ViewerDep) -> Response:
    tenant = await operator_tenant(session, viewer, slug)
    return await _links_page(request, session, runtime, viewer, tenant,
                             notice=NOTICES.get(request.query_params.get("notice", "")))


@router.post("/t/{slug}/connect-links")
async def create_connect_link(
    request: Request, slug: str, session: SessionDep, runtime: RuntimeDep, viewer: ViewerDep, request_id: RequestIdDep
) -> Response:
    tenant = await operator_tenant(session, viewer, slug)
    link, token = await links.create_connect_link(
        session, tenant=tenant, hours=runtime.settings.connect_link_hours, actor=viewer.actor(), request_id=request_id
    )
    return _link_shown(request, viewer, runtime, tenant, link, token, title="Connect link")


@router.post("/t/{slug}/connect-links/{link_id}/revoke")
async def revoke_connect_link(
    request: Request, slug: str, link_id: uuid.UUID, session: SessionDep, runtime: RuntimeDep, viewer: ViewerDep,
    request_id: RequestIdDep,
) -> Response:
    tenant = await operator_tenant(session, viewer, slug)
    try:
        await links.revoke(session, tenant=tenant, link_id=link_id, actor=viewer.actor(), request_id=request_id)
    except AppError as exc:
        return await _links_page(request, session, runtime, viewer, tenant, status_code=exc.status_code,
                                 error=exc.message, error_code=exc.code)
    return redirect(f"/t/{tenant.slug}/links?notice=link_revoked")


@router.post("/t/{slug}/connect-links/{link_id}/reissue")
async def reissue_connect_link(
    request: Request, slug: str, link_id: uuid.UUID, session: SessionDep, runtime: RuntimeDep, viewer: ViewerDep,
    request_id: RequestIdDep,
) -> Response:
    tenant = await operator_tenant(session, viewer, slug)
    try:
        link, token = await links.reissue(session, tenant=tenant, link_id=link_id, hours=runtime.settings.connect_link_hours,
                                          actor=viewer.actor(), request_id=request_id)
    except AppError as exc:
        return await _links_page(request, session, runtime, viewer, tenant, status_code=exc.status_code,
                                 error=exc.message, error_code=exc.code)
    return _link_shown(request, viewer, runtime, tenant, link, token, title="New connect link")


@router.post("/t/{slug}/invitations")
async def invite_org_admin(
    request: Request,
    slug: str,
    session: SessionDep,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
    email: Annotated[str, Form(max_length=320)] = "",
) -> Response:
    tenant = await operator_tenant(session, viewer, slug)
    try:
        invitation, token = await invitations.invite(
            session, role="org_admin", tenant=tenant, email=email, hours=runtime.settings.invitation_hours,
            actor=viewer.actor(), request_id=request_id,
        )
    except AppError as exc:
        return await _links_page(request, session, runtime, viewer, tenant, status_code=exc.status_code,
                                 invite_error=exc.message, invite_email=email)
    return _invitation_shown(request, viewer, runtime, tenant, invitation, token, back=f"/t/{tenant.slug}/links")


async def _invitation_for_operator(session, viewer, invitation_id: uuid.UUID) -> tuple[Invitation, Tenant | None]:
    require_operator(viewer)
    invitation = await invitations.get_invitation(session, invitation_id)
    tenant = await session.get(Tenant, invitation.tenant_id) if invitation.tenant_id is not None else None
    return invitation, tenant


def _invitations_home(tenant: Tenant | None) -> str:
    return f"/t/{tenant.slug}/links" if tenant is not None else "/people"


@router.post("/invitations/{invitation_id}/revoke")
async def revoke_invitation(
    request: Request,
    invitation_id: uuid.UUID,
    session: SessionDep,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
    back: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    """Revoke an invitation (an org admin's or an operator's); ``back`` is where to go next (a local path)."""
    invitation, tenant = await _invitation_for_operator(session, viewer, invitation_id)
    try:
        await invitations.revoke(session, invitation_id=invitation.id, actor=viewer.actor(), request_id=request_id)
    except AppError as exc:
        if tenant is None:
            raise
        return await _links_page(request, session, runtime, viewer, tenant, status_code=exc.status_code,
                                 error=exc.message, error_code=exc.code)
    return redirect(safe_next(back, _invitations_home(tenant)))


@router.post("/invitations/{invitation_id}/reissue")
async def reissue_invitation(
    request: Request,
    invitation_id: uuid.UUID,
    session: SessionDep,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
    back: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    """Revoke the invitation and show a new one, once; ``back`` is the shown page's way back (a local path)."""
    invitation, tenant = await _invitation_for_operator(session, viewer, invitation_id)
    try:
        new, token = await invitations.reissue(session, invitation_id=invitation.id, hours=runtime.settings.invitation_hours,
                                               actor=viewer.actor(), request_id=request_id)
    except AppError as exc:
        if tenant is None:
            raise
        return await _links_page(request, session, runtime, viewer, tenant, status_code=exc.status_code,
                                 error=exc.message, error_code=exc.code)
    return _invitation_shown(request, viewer, runtime, tenant, new, token,
                             back=safe_next(back, _invitations_home(tenant)))


async def _invite_context(session, invitation: Invitation) -> dict[str, Any]:
    tenant = await session.get(Tenant, invitation.tenant_id) if invitation.tenant_id is not None else None
    return {"email": invitation.email, "role": invitation.role, "organization": tenant.name if tenant else None}


@router.get("/invite/{token}")
async def invitation_page(request: Request, token: str, session: SessionDep, viewer: ViewerDep) -> Response:
    """Show the form; opening the link spends nothing."""
    try:
        invitation = await invitations.open_invitation(session, token)
    except AppError as exc:
        if exc.code not in invitations.REFUSALS:
            raise
        return _refused(request, viewer, exc)
    return render(request, viewer, "invite.html", token=token, **await _invite_context(session, invitation))


@router.post("/invite/{token}")
async def accept_invitation(
    request: Request,
    token: str,
    session: SessionDep,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
    name: Annotated[str, Form(max_length=200)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
    confirm: Annotated[str, Form(max_length=1024)] = "",
) -> Response:
    try:
        invitation = await invitations.open_invitation(session, token)
    except AppError as exc:
        if exc.code not in invitations.REFUSALS:
            raise
        return _refused(request, viewer, exc)
    context = await _invite_context(session, invitation)
    if password != confirm:
        return render(request, viewer, "invite.html", status_code=422, token=token, error="The two passwords differ.",
                      name=name, **context)
    try:
        user = await invitations.accept_invitation(session, token=token, password=password, name=name, request_id=request_id)
    except AppError as exc:
        if exc.code in invitations.REFUSALS:
            return _refused(request, viewer, exc)
        if exc.status_code != 422:
            raise
        return render(request, viewer, "invite.html", status_code=422, token=token, error=exc.message, name=name, **context)
    session_token, _ = await sessions.start(session, runtime.settings, user=user, replaces=viewer.token)
    response = redirect("/tenants" if user.role == "operator" else "/org")
    sessions.set_session_cookie(response, runtime.settings, session_token)
    return response
