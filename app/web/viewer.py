"""Who is looking: the signed-in person or connect-link session behind a browser request.

A session at stage ``mfa`` (right password, second factor still due) signs nobody in: its viewer
has no user and no web session (forms use the pre-sign-in CSRF cookie), only ``pending_user``
for the code page. Where MFA is required for operators, an operator without it is sent to the
enrolment on /account from every page but /account, /login and /logout (``MfaEnrolmentRequired``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import unquote, urlsplit

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from app.audit.audit_log import ACTOR_LINK, ACTOR_USER, Actor
from app.connections import links
from app.core.errors import AppError, Forbidden, LoginRequired, NotFound, PayloadTooLarge
from app.core.models import Tenant, User, WebSession
from app.deps import RuntimeDep, SessionDep
from app.identity import sessions
from app.tenants.registry import get_tenant

MAX_FORM_BYTES = 256 * 1024


@dataclass
class Viewer:
    web_session: WebSession | None
    user: User | None
    token: str | None
    anonymous_csrf: str | None = None
    new_anonymous_csrf: bool = False
    pending_user: User | None = None  # password right, second factor due (a session at stage "mfa")

    @property
    def signed_in(self) -> bool:
        return self.user is not None

    @property
    def is_operator(self) -> bool:
        return self.user is not None and self.user.role == "operator"

    @property
    def is_org_admin(self) -> bool:
        return self.user is not None and self.user.role == "org_admin"

    @property
    def link_tenant_id(self) -> uuid.UUID | None:
        return self.web_session.link_tenant_id if self.web_session and self.user is None else None

    @property
    def csrf_token(self) -> str:
        if self.web_session is not None:
            return self.web_session.csrf_token
        return self.anonymous_csrf or ""

    @property
    def label(self) -> str:
        return self.user.email if self.user else "connect link"

    def actor(self) -> Actor:
        if self.user is not None:
            return Actor(ACTOR_USER, self.user.email)
        # a link session acts as its connect link (the audit page names the link's tenant and sender);
        # a session whose link is spent keeps a prefix of its own id
        if self.web_session is not None and self.web_session.link_id is not None:
            return Actor(ACTOR_LINK, str(self.web_session.link_id))
        return Actor(ACTOR_LINK, self.web_session.id[:16] if self.web_session else None)

    def can_manage(self, tenant: Tenant) -> bool:
        """Operators manage every tenant; an org admin only their own."""
        return self.is_operator or (self.is_org_admin and self.user is not None and self.user.tenant_id == tenant.id)

    def can_connect(self, tenant: Tenant) -> bool:
        return self.can_manage(tenant) or self.link_tenant_id == tenant.id


class MfaEnrolmentRequired(AppError):
    """An operator without MFA where it is required: every page answers a redirect to the enrolment."""

    status_code, code, title = 303, "mfa_enrolment_required", "Set up two-step sign-in"
    message = "Operators must set up two-step sign-in before they continue."


ENROLMENT_URL = "/account#mfa"
# What an operator who must enrol can still reach: the enrolment itself, and signing in or out.
_OPEN_WITHOUT_MFA = ("/account", "/login", "/logout")


def _open_without_mfa(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in _OPEN_WITHOUT_MFA)


async def get_viewer(request: Request, session: SessionDep, runtime: RuntimeDep) -> Viewer:
    settings = runtime.settings
    token = request.cookies.get(sessions.session_cookie_name(settings))
    loaded = await sessions.load(session, settings, token)
    pending_user: User | None = None
    if loaded is not None:
        row, user = loaded
        if row.stage != sessions.STAGE_MFA:
            if (
                user is not None and user.role == "operator" and user.mfa_enabled_at is None
                and settings.mfa_required_for_operators and not _open_without_mfa(request.url.path)
                # once per request: the redirect's own page asks who is looking again, for its navigation
                and not getattr(request.state, "mfa_enrolment_required", False)
            ):
                request.state.mfa_enrolment_required = True
                raise MfaEnrolmentRequired(headers={"Location": ENROLMENT_URL})
            return Viewer(web_session=row, user=user, token=token)
        pending_user = user
    existing = request.cookies.get(sessions.csrf_cookie_name(settings))
    if existing and sessions.anonymous_csrf_valid(settings, existing, existing):
        return Viewer(None, None, token if pending_user else None, anonymous_csrf=existing, pending_user=pending_user)
    return Viewer(None, None, token if pending_user else None, anonymous_csrf=sessions.new_anonymous_csrf(settings),
                  new_anonymous_csrf=True, pending_user=pending_user)


ViewerDep = Annotated[Viewer, Depends(get_viewer)]


async def csrf_protect(request: Request, viewer: ViewerDep, runtime: RuntimeDep) -> None:
    """Every state-changing browser request carries the form's CSRF token and a same-origin Origin."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_FORM_BYTES):
        raise PayloadTooLarge("The form is too large.")
    origin = request.headers.get("origin")
    if origin and origin != "null":
        public = urlsplit(runtime.settings.public_url)
        if origin.rstrip("/") != f"{public.scheme}://{public.netloc}":
            raise Forbidden("The form did not come from this site.", code="csrf_failed")
    form = await request.form(max_fields=500, max_files=0)
    submitted = form.get("csrf_token")
    submitted = submitted if isinstance(submitted, str) else None
    if viewer.web_session is not None:
        ok = sessions.session_csrf_valid(viewer.web_session, submitted)
    else:
        cookie = request.cookies.get(sessions.csrf_cookie_name(runtime.settings))
        ok = sessions.anonymous_csrf_valid(runtime.settings, cookie, submitted)
    if not ok:
        raise Forbidden(
            "The form expired or did not come from this site. Reload the page and try again.",
            code="csrf_failed",
        )


def safe_next(target: str | None, default: str = "/") -> str:
    """Only a local path: no scheme, no host, no protocol-relative or backslash tricks."""
    if not target or len(target) > 500:
        return default
    for form in (target, unquote(target)):  # an encoded "//" or "\\" is refused too
        if not form.startswith("/") or form.startswith("//") or "\\" in form or any(ord(c) < 32 or c == " " for c in form):
            return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return default
    return target


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def render(request: Request, viewer: Viewer, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    templates = request.app.state.templates
    response = templates.TemplateResponse(
        request, template, {"viewer": viewer, "csrf_token": viewer.csrf_token, **context}, status_code=status_code
    )
    if viewer.new_anonymous_csrf and viewer.anonymous_csrf:
        sessions.set_csrf_cookie(response, request.app.state.settings, viewer.anonymous_csrf)
    response.headers["Cache-Control"] = "no-store"
    return response


async def tenant_for(session, viewer: Viewer, slug: str, *, connect: bool = False, finished: bool = False) -> Tenant:
    """The tenant named in the URL, if this viewer may see it; otherwise 404 (no probing).

    A connect-link session works only while its link does: once the link is revoked, expired or
    used (by this browser or another), it is refused (410 with the reason) before any page or form;
    ``finished`` marks the one page a session of a spent link may still see ("connected").
    """

    if viewer.web_session is None:
        raise LoginRequired()
    try:
        tenant = await get_tenant(session, slug)
    except NotFound:
        raise NotFound("No such tenant.", code="tenant_not_found") from None
    allowed = viewer.can_connect(tenant) if connect else viewer.can_manage(tenant)
    if not allowed:
        raise NotFound("No such tenant.", code="tenant_not_found")
    if viewer.user is None:
        await links.check_session(session, viewer.web_session, finished=finished)
    return tenant


def require_user(viewer: Viewer) -> None:
    if viewer.user is None:
        raise LoginRequired()


def require_operator(viewer: Viewer) -> None:
    require_user(viewer)
    if not viewer.is_operator:
        raise Forbidden("Only operators can do this.", code="operator_only")


async def operator_tenant(session, viewer: Viewer, slug: str) -> Tenant:
    """The tenant named in the URL, for an operator-only action."""
    require_operator(viewer)
    return await tenant_for(session, viewer, slug)
