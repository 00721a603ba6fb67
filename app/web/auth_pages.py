"""Sign-in and sign-out."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response

from app.core.errors import AppError
from app.deps import RuntimeDep, SessionDep
from app.identity import people, sessions
from app.web.viewer import ViewerDep, csrf_protect, redirect, render, safe_next

router = APIRouter(dependencies=[Depends(csrf_protect)], include_in_schema=False)


def _client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@router.get("/")
async def home(viewer: ViewerDep) -> Response:
    if viewer.is_operator:
        return redirect("/tenants")
    if viewer.user is not None and viewer.user.tenant_id is not None:
        return redirect("/org")
    if viewer.link_tenant_id is not None:
        return redirect("/org")
    return redirect("/login")


@router.get("/login")
async def login_page(request: Request, viewer: ViewerDep, next: str | None = None) -> Response:
    if viewer.signed_in:
        return redirect(safe_next(next))
    return render(request, viewer, "login.html", next=safe_next(next, ""))


@router.post("/login")
async def login(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    email: Annotated[str, Form(max_length=320)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
    next: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    try:
        user = await people.authenticate(
            session, email=email, password=password, ip=_client_ip(request),
            limit_per_15_minutes=runtime.settings.login_attempts_per_15_minutes,
        )
    except AppError as exc:
        return render(request, viewer, "login.html", status_code=exc.status_code, error=exc.message,
                      email=email[:320], next=safe_next(next, ""))
    token, _ = await sessions.start(session, runtime.settings, user=user, replaces=viewer.token)
    response = redirect(safe_next(next))
    sessions.set_session_cookie(response, runtime.settings, token)
    return response


@router.post("/logout")
async def logout(session: SessionDep, runtime: RuntimeDep, viewer: ViewerDep) -> Response:
    await sessions.end(session, viewer.token)
    response = redirect("/login")
    sessions.clear_session_cookie(response, runtime.settings)
    return response
