"""Connect links and invitations: issuing them, opening a connect link, accepting an invitation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response

from app.connections import links
from app.core.errors import AppError
from app.deps import RequestIdDep, RuntimeDep, SessionDep
from app.identity import invitations, sessions
from app.web.tenant_pages import tenant_context
from app.web.viewer import ViewerDep, csrf_protect, operator_tenant, redirect, render

router = APIRouter(dependencies=[Depends(csrf_protect)], include_in_schema=False)


@router.get("/connect/{token}")
async def open_connect_link(
    token: str, session: SessionDep, runtime: RuntimeDep, viewer: ViewerDep, request_id: RequestIdDep
) -> Response:
    """Spend the link once and turn it into a browser session bound to its tenant."""
    tenant = await links.redeem_connect_link(session, token, request_id=request_id)
    if viewer.signed_in and viewer.can_manage(tenant):
        return redirect(f"/t/{tenant.slug}/connect")
    session_token, _ = await sessions.start(session, runtime.settings, link_tenant_id=tenant.id, replaces=viewer.token)
    response = redirect(f"/t/{tenant.slug}/connect")
    sessions.set_session_cookie(response, runtime.settings, session_token)
    return response


@router.post("/t/{slug}/connect-links")
async def create_connect_link(
    request: Request, slug: str, session: SessionDep, runtime: RuntimeDep, viewer: ViewerDep, request_id: RequestIdDep
) -> Response:
    tenant = await operator_tenant(session, viewer, slug)
    link, token = await links.create_connect_link(
        session, tenant=tenant, hours=runtime.settings.connect_link_hours, actor=viewer.actor(), request_id=request_id
    )
    return render(request, viewer, "shown_once.html", tenant=tenant, title="Connect link",
                  url=f"{runtime.settings.public_url}/connect/{token}", expires_at=link.expires_at,
                  explain="Send this link to the organization's admin. It works once and expires; it is shown only now.")


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
        invitation, token = await invitations.invite_org_admin(
            session, tenant=tenant, email=email, hours=runtime.settings.invitation_hours,
            actor=viewer.actor(), request_id=request_id,
        )
    except AppError as exc:
        context = await tenant_context(session, runtime, tenant, viewer)
        return render(request, viewer, "tenant.html", status_code=exc.status_code, invite_error=exc.message, **context)
    return render(request, viewer, "shown_once.html", tenant=tenant, title=f"Invitation for {invitation.email}",
                  url=f"{runtime.settings.public_url}/invite/{token}", expires_at=invitation.expires_at,
                  explain="Send this link to the new org admin. It works once and expires; it is shown only now.")


@router.get("/invite/{token}")
async def invitation_page(request: Request, token: str, session: SessionDep, viewer: ViewerDep) -> Response:
    invitation = await invitations.open_invitation(session, token)
    return render(request, viewer, "invite.html", email=invitation.email, token=token)


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
    invitation = await invitations.open_invitation(session, token)
    if password != confirm:
        return render(request, viewer, "invite.html", status_code=422, email=invitation.email, token=token,
                      error="The two passwords differ.", name=name)
    try:
        user = await invitations.accept_invitation(session, token=token, password=password, name=name, request_id=request_id)
    except AppError as exc:
        if exc.status_code != 422:
            raise
        return render(request, viewer, "invite.html", status_code=422, email=invitation.email, token=token,
                      error=exc.message, name=name)
    session_token, _ = await sessions.start(session, runtime.settings, user=user, replaces=viewer.token)
    response = redirect("/org")
    sessions.set_session_cookie(response, runtime.settings, session_token)
    return response
