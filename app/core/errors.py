"""One error base class, rendered as JSON under /api/ and as an HTML page in the browser.

Every error has a stable machine-readable ``code``. Nothing from an exception's internals
(stack, SQL, upstream bodies) reaches the client; unexpected errors are logged with the
request id and answered with a generic 500 that names that id.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    OperationalError,
    ProgrammingError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.logs import get_logger

log = get_logger(__name__)

BAA_REQUIRED_MESSAGE = "Access denied. You must have a signed Business Associate Agreement (BAA) to continue."


class AppError(Exception):
    """Base of every error we answer on purpose."""

    status_code: int = 400
    code: str = "bad_request"
    message: str = "The request could not be processed."
    title: str = "Something is not right"

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message or type(self).message
        self.code = code or type(self).code
        self.status_code = status_code or type(self).status_code
        self.headers = headers or {}
        self.extra = extra or {}
        self.hint = hint
        super().__init__(self.message)


class BadRequest(AppError):
    status_code, code = 400, "bad_request"


class Unauthorized(AppError):
    status_code, code, message, title = 401, "unauthorized", "Authentication is required.", "Sign in needed"


class LoginRequired(Unauthorized):
    """A browser page that needs a signed-in session: answered with a redirect to /login."""

    code, message = "login_required", "Sign in to continue."


class Forbidden(AppError):
    status_code, code, message, title = 403, "forbidden", "You are not allowed to do that.", "Not allowed"


class NotFound(AppError):
    status_code, code, message, title = 404, "not_found", "Nothing was found here.", "Not found"


class Conflict(AppError):
    status_code, code, title = 409, "conflict", "Conflict"


class Gone(AppError):
    status_code, code, title = 410, "gone", "No longer valid"


class PayloadTooLarge(AppError):
    status_code, code, message = 413, "payload_too_large", "The request body is too large."


class ValidationFailed(AppError):
    status_code, code, message = 422, "invalid_request", "The request is not valid."


class RateLimited(AppError):
    status_code, code, message, title = 429, "rate_limited", "Too many requests; slow down.", "Slow down"


class ServiceUnavailable(AppError):
    status_code, code, message, title = 503, "service_unavailable", "The service is unavailable; try again shortly.", "Unavailable"


class UpstreamError(AppError):
    status_code, code, message, title = 502, "upstream_unavailable", "Salesmsg could not be reached.", "Salesmsg unavailable"


class Refusal(AppError):
    """A refusal with its status given where it is raised (the proxy's rules, the HIPAA gate)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, code=code, status_code=status, headers=headers)


def wants_json(path: str) -> bool:
    return path.startswith("/api/") or path in ("/healthz", "/readyz", "/metrics")


def error_body(code: str, message: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **(extra or {})}}


def error_json(code: str, message: str) -> bytes:
    """``error_body`` as compact JSON bytes, for the plain-ASGI proxy."""
    return json.dumps(error_body(code, message), separators=(",", ":")).encode()


def render_error(
    request: Request,
    *,
    status_code: int,
    code: str,
    message: str,
    title: str = "Something is not right",
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
    hint: str | None = None,
    page: dict[str, Any] | None = None,
) -> Response:
    """``page``: more context for the HTML page (who is signed in, for the navigation; see
    ``page_context``)."""
    if wants_json(request.url.path):
        return JSONResponse(error_body(code, message, extra), status_code=status_code, headers=headers)
    templates = getattr(request.app.state, "templates", None)
    request_id = request.scope.get("state", {}).get("request_id", "")
    if templates is None:  # pragma: no cover - only before the lifespan has run
        return HTMLResponse(f"<h1>{status_code}</h1>", status_code=status_code, headers=headers)
    response = templates.TemplateResponse(
        request,
        "error.html",
        {**(page or {}), "status_code": status_code, "code": code, "message": message, "title": title, "hint": hint,
         "request_id": request_id},
        status_code=status_code,
        headers=headers,
    )
    if page:
        response.headers["Cache-Control"] = "no-store"  # it names the signed-in person
    return response


# The app sets ``app.state.error_page_context``: an async callable that returns the template
# context naming who is signed in (``viewer``, ``csrf_token``), so an error page keeps the
# navigation. It lives with the pages (this layer cannot import them); without it, or when it
# fails, the page is shown without navigation.
async def page_context(request: Request) -> dict[str, Any]:
    if wants_json(request.url.path):
        return {}
    hook = getattr(request.app.state, "error_page_context", None)
    if hook is None:
        return {}
    try:
        return dict(await hook(request))
    except Exception as exc:  # noqa: BLE001 - an error page must never fail for want of a name
        log.warning("error page shown without navigation", error=type(exc).__name__)
        return {}


async def _app_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AppError)
    if isinstance(exc, LoginRequired) and not wants_json(request.url.path):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse("/login?" + urlencode({"next": target}), status_code=303)
    return render_error(
        request,
        status_code=exc.status_code,
        code=exc.code,
        message=exc.message,
        title=exc.title,
        headers=exc.headers,
        extra=exc.extra,
        hint=exc.hint,
        page=await page_context(request),
    )


_HTTP_CODES = {
    400: ("bad_request", "The request could not be processed."),
    401: ("unauthorized", "Authentication is required."),
    403: ("forbidden", "You are not allowed to do that."),
    404: ("not_found", "Nothing was found here."),
    405: ("method_not_allowed", "That method is not allowed here."),
    406: ("not_acceptable", "No acceptable representation."),
    413: ("payload_too_large", "The request body is too large."),
    415: ("unsupported_media_type", "That content type is not supported."),
}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code, message = _HTTP_CODES.get(exc.status_code, ("http_error", "The request could not be processed."))
    return render_error(
        request,
        status_code=exc.status_code,
        code=code,
        message=message,
        title="Not found" if exc.status_code == 404 else "Something is not right",
        headers=getattr(exc, "headers", None),
        page=await page_context(request),
    )


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    fields = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err.get("loc", ()) if part not in ("body", "query", "path"))
        fields.append({"field": loc or "body", "problem": str(err.get("msg", "invalid"))[:200]})
    return render_error(
        request,
        status_code=422,
        code="invalid_request",
        message="The request is not valid.",
        extra={"fields": fields[:50]},
        page=await page_context(request),
    )


async def _database_error(request: Request, exc: Exception) -> Response:
    log.warning("database unavailable", error=type(exc).__name__)
    return render_error(
        request,
        status_code=503,
        code="service_unavailable",
        message="The service is unavailable; try again shortly.",
        title="Unavailable",
        headers={"Retry-After": "5"},
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    if is_database_unavailable(exc):
        return await _database_error(request, exc)
    log.exception("unhandled error", path=request.url.path)
    return render_error(
        request,
        status_code=500,
        code="internal_error",
        message="Something went wrong on our side. The request id helps us find it.",
        title="Something went wrong",
        page=await page_context(request),
    )


# SQLSTATE classes that mean "the database cannot serve us right now", not "our query is wrong":
# 08 connection exception, 53 insufficient resources (53300 too many clients), 57P operator
# intervention (57P01 admin shutdown, 57P03 starting up).
UNAVAILABLE_SQLSTATES = ("08", "53", "57P")
# what drivers say when the connection itself is gone (asyncpg's InterfaceError has no SQLSTATE)
_DISCONNECT_PHRASES = ("connection is closed", "connection was closed", "connection refused", "could not connect",
                       "cannot connect", "connection reset", "closed the connection", "terminating connection",
                       "connection does not exist", "unable to open database")


def is_database_unavailable(exc: BaseException) -> bool:
    """The database cannot serve us right now (down, restarting, full), as opposed to a bad query."""
    if isinstance(exc, PoolTimeout):  # every pooled connection busy for pool_timeout seconds
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated or isinstance(exc, OperationalError):
            return True
        sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None) or ""
        if sqlstate:
            return str(sqlstate).startswith(UNAVAILABLE_SQLSTATES)
        if isinstance(exc, (IntegrityError, ProgrammingError, DataError)):
            return False  # our query or data, never the database's availability
        text = str(exc.orig).lower()
        return isinstance(exc.orig, OSError) or any(phrase in text for phrase in _DISCONNECT_PHRASES)
    return isinstance(exc, OSError)  # ConnectionError and TimeoutError among them


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
