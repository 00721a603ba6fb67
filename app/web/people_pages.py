"""People (operators only): who can sign in, invitations, disabling, reset links, MFA resets.
Account (everyone signed in): one's own password and two-step sign-in (TOTP, recovery codes).

Secrets shown here (an invitation or reset link, a TOTP secret while enrolling, recovery codes)
are in the page body only, never in a URL or a log, and links and codes are shown once.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response
from markupsafe import Markup
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.errors import AppError, Conflict
from app.core.models import Tenant, User
from app.deps import RequestIdDep, RuntimeDep, SessionDep
from app.identity import invitations, mfa, password_resets, people, sessions
from app.runtime import Runtime
from app.tenants import registry
from app.web.viewer import Viewer, ViewerDep, csrf_protect, redirect, render, require_operator, require_user

router = APIRouter(dependencies=[Depends(csrf_protect)], include_in_schema=False)

PEOPLE_NOTICES = {
    "disabled": "The person is disabled; their sessions have ended.",
    "enabled": "The person can sign in again.",
    "mfa_reset": "Two-step sign-in was removed; they set it up again after signing in.",
}
ACCOUNT_NOTICES = {
    "password": "Your password is changed. Your other sessions have ended.",
    "mfa_off": "Two-step sign-in is off.",
    "setup_cancelled": "The set-up was cancelled.",
}


def _client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


# ---- people -------------------------------------------------------------------------------


async def _people_context(session: AsyncSession, viewer: Viewer, role: str | None) -> dict[str, Any]:
    role = role if role in people.ROLES else None
    return {
        "rows": await people.list_people(session, role=role),
        "role": role or "",
        "tenants": (await session.scalars(select(Tenant).order_by(Tenant.name))).all(),
        "pending_invitations": await invitations.outstanding(session, role="operator"),
        "me": viewer.user.id if viewer.user else None,
    }


async def _people_error(request: Request, session: SessionDep, viewer: Viewer, exc: AppError, **extra: Any) -> Response:
    # Every refusal is raised before anything changes (a wrong code's attempt row and audit row are
    # committed on purpose), so the page is rendered from the session as it is.
    context = await _people_context(session, viewer, None)
    return render(request, viewer, "people.html", status_code=exc.status_code, error=exc.message, error_code=exc.code,
                  **context, **extra)


@router.get("/people")
async def people_page(
    request: Request, session: SessionDep, viewer: ViewerDep, role: str | None = None, notice: str | None = None
) -> Response:
    require_operator(viewer)
    context = await _people_context(session, viewer, role)
    return render(request, viewer, "people.html", notice=PEOPLE_NOTICES.get(notice or ""), **context)


@router.post("/people/invite")
async def invite_person(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
    role: Annotated[str, Form(max_length=20)] = "",
    email: Annotated[str, Form(max_length=320)] = "",
    tenant: Annotated[str, Form(max_length=63)] = "",
) -> Response:
    require_operator(viewer)
    try:
        tenant_row = None
        if role == "org_admin" and tenant:
            tenant_row = await registry.get_tenant(session, tenant)
        invitation, token = await invitations.invite(
            session, role=role, tenant=tenant_row, email=email, hours=runtime.settings.invitation_hours,
            actor=viewer.actor(), request_id=request_id,
        )
    except AppError as exc:
        return await _people_error(request, session, viewer, exc, invite_error=True, invite_email=email[:320],
                                   invite_role=role, invite_tenant=tenant)
    who = "an operator" if role == "operator" else f"the admin of {tenant_row.name if tenant_row else ''}"
    return render(request, viewer, "shown_once.html", back="/people", back_label="Back to people",
                  title=f"Invitation for {invitation.email}",
                  explain=f"Send this link to {invitation.email}: it lets them choose a password and sign in as {who}. "
                          "It is shown only now; opening it spends nothing, accepting it does.",
                  url=f"{runtime.settings.public_url}/invite/{token}", expires_at=invitation.expires_at)


async def _person(session: AsyncSession, user_id: uuid.UUID) -> User:
    return await people.get_user(session, user_id)


def _not_yourself(viewer: Viewer, person: User, what: str) -> None:
    """One's own password and MFA change on the account page, which asks for the current password
    or a code; the people page would change them without either."""
    if viewer.user is not None and person.id == viewer.user.id:
        raise Conflict(f"You cannot {what} for yourself here: use your account page (/account).", code="use_account_page")


@router.post("/people/{user_id}/disable")
async def disable_person(
    request: Request, user_id: uuid.UUID, session: SessionDep, viewer: ViewerDep, request_id: RequestIdDep
) -> Response:
    require_operator(viewer)
    person = await _person(session, user_id)
    try:
        await people.disable_user(session, user=person, actor=viewer.actor(),
                                  acting_user_id=viewer.user.id if viewer.user else None, request_id=request_id)
    except AppError as exc:
        return await _people_error(request, session, viewer, exc)
    return redirect("/people?notice=disabled")


@router.post("/people/{user_id}/enable")
async def enable_person(user_id: uuid.UUID, session: SessionDep, viewer: ViewerDep, request_id: RequestIdDep) -> Response:
    require_operator(viewer)
    person = await _person(session, user_id)
    await people.enable_user(session, user=person, actor=viewer.actor(), request_id=request_id)
    return redirect("/people?notice=enabled")


@router.post("/people/{user_id}/reset-link")
async def reset_link(
    request: Request, user_id: uuid.UUID, session: SessionDep, runtime: RuntimeDep, viewer: ViewerDep,
    request_id: RequestIdDep,
) -> Response:
    require_operator(viewer)
    person = await _person(session, user_id)
    try:
        _not_yourself(viewer, person, "issue a password reset link")
    except AppError as exc:
        return await _people_error(request, session, viewer, exc)
    reset, token = await password_resets.issue(session, user=person, minutes=runtime.settings.password_reset_minutes,
                                               actor=viewer.actor(), request_id=request_id)
    return render(request, viewer, "shown_once.html", back="/people", back_label="Back to people",
                  title=f"Password reset link for {person.email}",
                  explain=f"Send this link to {person.email} by a channel you trust. It works once, and only until it "
                          "expires; any older reset link of theirs no longer works. It is shown only now.",
                  url=f"{runtime.settings.public_url}/reset/{token}", expires_at=reset.expires_at)


@router.post("/people/{user_id}/reset-mfa")
async def reset_mfa(
    request: Request, user_id: uuid.UUID, session: SessionDep, viewer: ViewerDep, request_id: RequestIdDep
) -> Response:
    require_operator(viewer)
    person = await _person(session, user_id)
    try:
        _not_yourself(viewer, person, "reset two-step sign-in")
    except AppError as exc:
        return await _people_error(request, session, viewer, exc)
    await mfa.reset(session, user=person, actor=viewer.actor(), request_id=request_id)
    return redirect("/people?notice=mfa_reset")


# ---- account ------------------------------------------------------------------------------


async def _account_context(session: AsyncSession, runtime: Runtime, user: User) -> dict[str, Any]:
    context: dict[str, Any] = {
        "mfa_on": mfa.is_enabled(user),
        "mfa_required": runtime.settings.mfa_required_for_operators and user.role == "operator",
        "codes_left": await mfa.recovery_codes_left(session, user) if mfa.is_enabled(user) else 0,
        "enrolling": mfa.enrolment_pending(user),
    }
    if context["enrolling"]:
        secret = mfa.secret_of(runtime.keyring, user)
        context["secret"] = mfa.grouped(secret)
        context["qr"] = Markup(mfa.qr_svg(mfa.provisioning_uri(secret, user.email)))  # noqa: S704 - segno's SVG, no user markup
    return context


async def _account(request: Request, session: AsyncSession, runtime: Runtime, viewer: Viewer, *, status_code: int = 200,
                   **extra: Any) -> Response:
    assert viewer.user is not None
    context = await _account_context(session, runtime, viewer.user)
    return render(request, viewer, "account.html", status_code=status_code, **context, **extra)


async def _account_error(request: Request, session: AsyncSession, runtime: Runtime, viewer: Viewer, exc: AppError,
                         field: str) -> Response:
    return await _account(request, session, runtime, viewer, status_code=exc.status_code,
                          errors={field: exc.message}, error_code=exc.code)


async def _renew_session(session: AsyncSession, runtime: Runtime, viewer: Viewer) -> tuple[Viewer, str]:
    """After a password or MFA change: this browser goes on with a new session id (the person's
    other sessions were ended); the viewer returned carries the new session's CSRF token."""
    assert viewer.user is not None
    token, row = await sessions.start(session, runtime.settings, user=viewer.user, replaces=viewer.token)
    return dataclasses.replace(viewer, web_session=row, token=token), token


@router.get("/account")
async def account_page(
    request: Request, session: SessionDep, runtime: RuntimeDep, viewer: ViewerDep, notice: str | None = None,
    left: int | None = None,
) -> Response:
    require_user(viewer)
    text = ACCOUNT_NOTICES.get(notice or "")
    if notice == "recovery_code_used":
        text = f"You signed in with a recovery code; {left or 0} left. Make new ones if you are running out."
    return await _account(request, session, runtime, viewer, notice=text)


@router.post("/account/password")
async def change_password(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
    current: Annotated[str, Form(max_length=1024)] = "",
    new: Annotated[str, Form(max_length=1024)] = "",
    again: Annotated[str, Form(max_length=1024)] = "",
) -> Response:
    require_user(viewer)
    assert viewer.user is not None
    try:
        await people.change_password(
            session, user=viewer.user, current=current, new=new, again=again, ip=_client_ip(request),
            keep_session=viewer.token, limit_per_15_minutes=runtime.settings.login_attempts_per_15_minutes,
            request_id=request_id,
        )
    except AppError as exc:
        return await _account_error(request, session, runtime, viewer, exc, "password")
    _, token = await _renew_session(session, runtime, viewer)
    response = redirect("/account?notice=password")
    sessions.set_session_cookie(response, runtime.settings, token)
    return response


@router.post("/account/mfa/setup")
async def mfa_setup(request: Request, session: SessionDep, runtime: RuntimeDep, viewer: ViewerDep) -> Response:
    require_user(viewer)
    assert viewer.user is not None
    try:
        mfa.begin_enrolment(user=viewer.user, keyring=runtime.keyring)
    except AppError as exc:
        return await _account_error(request, session, runtime, viewer, exc, "mfa")
    return redirect("/account#mfa")


@router.post("/account/mfa/cancel")
async def mfa_cancel(session: SessionDep, viewer: ViewerDep) -> Response:
    require_user(viewer)
    assert viewer.user is not None
    await mfa.cancel_enrolment(viewer.user)
    return redirect("/account?notice=setup_cancelled#mfa")


async def _with_code(request: Request, session: AsyncSession, runtime: Runtime, viewer: Viewer, request_id: str | None,
                     code: str, form: str, action, **extra: Any) -> tuple[Any, Response | None]:
    """Run an MFA action that needs a current code (counted and limited like a sign-in); on an error
    the account page comes back with ``form`` showing it. Returns (the action's result, None) or
    (None, the error page)."""
    require_user(viewer)
    assert viewer.user is not None
    try:
        result = await action(
            session, user=viewer.user, code=code, keyring=runtime.keyring, ip=_client_ip(request),
            limit_per_15_minutes=runtime.settings.mfa_attempts_per_15_minutes, request_id=request_id, **extra,
        )
    except AppError as exc:
        return None, await _account_error(request, session, runtime, viewer, exc, form)
    return result, None


async def _recovery_codes_page(request: Request, session: AsyncSession, runtime: Runtime, viewer: Viewer,
                               codes: list[str], *, first: bool) -> Response:
    """The new recovery codes, shown once, in the new session the change gave this browser."""
    renewed, token = await _renew_session(session, runtime, viewer)
    response = render(request, renewed, "recovery_codes.html", codes=codes, first=first)
    sessions.set_session_cookie(response, runtime.settings, token)
    return response


@router.post("/account/mfa/confirm")
async def mfa_confirm(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
    code: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    codes, error = await _with_code(request, session, runtime, viewer, request_id, code, "confirm", mfa.confirm_enrolment)
    return error or await _recovery_codes_page(request, session, runtime, viewer, codes, first=True)


@router.post("/account/mfa/recovery-codes")
async def mfa_recovery_codes(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
    code: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    codes, error = await _with_code(request, session, runtime, viewer, request_id, code, "regenerate",
                                    mfa.regenerate_recovery_codes)
    return error or await _recovery_codes_page(request, session, runtime, viewer, codes, first=False)


@router.post("/account/mfa/disable")
async def mfa_disable(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
    code: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    _, error = await _with_code(request, session, runtime, viewer, request_id, code, "disable", mfa.disable,
                                required=runtime.settings.mfa_required_for_operators)
    if error:
        return error
    _, token = await _renew_session(session, runtime, viewer)
    response = redirect("/account?notice=mfa_off#mfa")
    sessions.set_session_cookie(response, runtime.settings, token)
    return response
