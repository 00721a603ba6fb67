"""Sign-in (password, then the second factor for a person with MFA), sign-out, password reset links."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response

from app.core.errors import AppError
from app.deps import RequestIdDep, RuntimeDep, SessionDep
from app.identity import mfa, password_resets, people, sessions
from app.web.viewer import ViewerDep, csrf_protect, redirect, render, safe_next

router = APIRouter(dependencies=[Depends(csrf_protect)], include_in_schema=False)

NOTICES = {"password_reset": "Your password is set. Sign in with it."}


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
async def login_page(request: Request, viewer: ViewerDep, next: str | None = None, notice: str | None = None) -> Response:
    if viewer.signed_in:
        return redirect(safe_next(next))
    return render(request, viewer, "login.html", next=safe_next(next, ""), notice=NOTICES.get(notice or ""))


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
        refused = render(request, viewer, "login.html", status_code=exc.status_code, error=exc.message,
                         email=email[:320], next=safe_next(next, ""))
        refused.headers.update(exc.headers)
        return refused
    if mfa.is_enabled(user):
        # The password was right; nobody is signed in until the second factor is too.
        token, _ = await sessions.start(session, runtime.settings, user=user, replaces=viewer.token, stage=sessions.STAGE_MFA)
        target = "/login/mfa" + (f"?{urlencode({'next': safe_next(next, '')})}" if safe_next(next, "") else "")
        response = redirect(target)
    else:
        people.record_sign_in(user)
        token, _ = await sessions.start(session, runtime.settings, user=user, replaces=viewer.token)
        response = redirect(safe_next(next))
    sessions.set_session_cookie(response, runtime.settings, token)
    return response


@router.get("/login/mfa")
async def login_mfa_page(request: Request, viewer: ViewerDep, next: str | None = None) -> Response:
    if viewer.signed_in:
        return redirect(safe_next(next))
    if viewer.pending_user is None:
        return redirect("/login")
    return render(request, viewer, "login_mfa.html", next=safe_next(next, ""))


@router.post("/login/mfa")
async def login_mfa(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
    code: Annotated[str, Form(max_length=64)] = "",
    next: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    user = viewer.pending_user
    if user is None:  # the code page expired (or was never reached with a right password)
        return render(request, viewer, "login.html", status_code=401, next=safe_next(next, ""),
                      error="Your sign-in took too long. Enter your email and password again.")
    try:
        verified = await mfa.check_code(
            session, user=user, code=code, keyring=runtime.keyring, ip=_client_ip(request),
            limit_per_15_minutes=runtime.settings.mfa_attempts_per_15_minutes, request_id=request_id,
        )
    except AppError as exc:
        refused = render(request, viewer, "login_mfa.html", status_code=exc.status_code, error=exc.message,
                         error_code=exc.code, next=safe_next(next, ""))
        refused.headers.update(exc.headers)  # Retry-After when the attempts are used up
        return refused
    people.record_sign_in(user)
    token, _ = await sessions.start(session, runtime.settings, user=user, replaces=viewer.token)
    target = safe_next(next)
    if verified.method == "recovery_code":
        target = "/account?" + urlencode({"notice": "recovery_code_used", "left": verified.recovery_codes_left or 0})
    response = redirect(target)
    sessions.set_session_cookie(response, runtime.settings, token)
    return response


@router.post("/logout")
async def logout(session: SessionDep, runtime: RuntimeDep, viewer: ViewerDep) -> Response:
    await sessions.end(session, viewer.token)
    response = redirect("/login")
    sessions.clear_session_cookie(response, runtime.settings)
    return response


@router.get("/reset/{token}")
async def reset_page(request: Request, token: str, session: SessionDep, viewer: ViewerDep) -> Response:
    """The form only: opening the link spends nothing."""
    _, user = await password_resets.open_reset(session, token)
    return render(request, viewer, "reset_password.html", email=user.email, token=token)


@router.post("/reset/{token}")
async def reset_password(
    request: Request,
    token: str,
    session: SessionDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
    password: Annotated[str, Form(max_length=1024)] = "",
    again: Annotated[str, Form(max_length=1024)] = "",
) -> Response:
    _, user = await password_resets.open_reset(session, token)
    try:
        await password_resets.use(session, token=token, password=password, again=again, request_id=request_id)
    except AppError as exc:
        if exc.status_code != 422:
            raise
        return render(request, viewer, "reset_password.html", status_code=422, email=user.email, token=token, error=exc.message)
    return redirect("/login?notice=password_reset")
