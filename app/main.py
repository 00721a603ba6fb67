"""The app factory. ``create_app(settings)`` builds everything; nothing is read at import time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles

from app import __version__
from app.api import routes as api_routes
from app.api.health import router as health_router
from app.core import tracing
from app.core.errors import _unexpected, install_error_handlers
from app.core.http_server import LIMITS_STATE_KEY, HeadLimits
from app.core.logs import configure_logging, get_logger
from app.core.middleware import RequestContextMiddleware
from app.core.paths import STATIC_DIR
from app.core.settings import Settings
from app.runtime import Runtime
from app.web import ROUTERS as WEB_ROUTERS
from app.web.templating import create_templates
from app.web.viewer import get_viewer

log = get_logger(__name__)


def create_app(settings: Settings | None = None, *, configure_logs: bool = True) -> FastAPI:
    """Build the ASGI app. Refuses production settings that carry an example secret."""
    settings = settings or Settings()
    settings.check_secure()
    traced = tracing.start(settings)  # once per process, when an OTLP endpoint is configured
    if configure_logs:
        json_logs = settings.log_format == "json" or (settings.log_format == "auto" and settings.is_production)
        configure_logging(level=settings.log_level, json_output=json_logs, trace_ids=traced)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, object]]:
        runtime = await Runtime.start(settings, serving=True)
        app.state.runtime = runtime
        if settings.run_worker:
            runtime.start_worker()
        log.info("started", version=__version__, env=settings.env.value, database=runtime.db.dialect)
        try:
            # uvicorn hands the lifespan state to its protocol: the bounds of a request's head
            yield {"runtime": runtime, LIMITS_STATE_KEY: HeadLimits.of(settings)}
        finally:
            await runtime.stop()
            await tracing.flush_soon()
            log.info("stopped")

    app = FastAPI(
        title="Salesmsg Connect",
        version=__version__,
        description=(
            "Management API and REST proxy of Salesmsg Connect. Authenticate with "
            "`Authorization: Bearer <api key>`."
        ),
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
        # FastAPI's own telemetry would record raw paths and query values: traces are ours (ServerSpans)
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False, "auto_configure": False},
    )
    app.state.settings = settings
    app.state.templates = create_templates(settings)
    app.state.error_page_context = _error_page_context
    install_error_handlers(app)
    app.include_router(health_router)
    app.include_router(api_routes.router)
    for router in WEB_ROUTERS:
        app.include_router(router)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    authorize = urlsplit(settings.salesmsg_authorize_url)
    app.add_middleware(
        RequestContextMiddleware,
        https=settings.https,
        authorize_origin=f"{authorize.scheme}://{authorize.netloc}",
        on_error=_unexpected,
    )
    tracer_provider = tracing.provider()
    if tracer_provider is not None:  # outermost, so the proxy our middleware dispatches is traced too
        app.add_middleware(tracing.ServerSpans, tracer_provider=tracer_provider)
    return app


async def _error_page_context(request: Request) -> dict[str, Any]:
    """Who is signed in, for an error page's navigation (``app.core.errors.page_context``): the
    same ``get_viewer`` as every page, in a session of its own that writes nothing (it is never
    committed), since the request's own unit of work has already ended or failed."""
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        return {}
    async with runtime.db.sessionmaker() as session:
        viewer = await get_viewer(request, session, runtime)
    if viewer.web_session is None:
        return {}
    return {"viewer": viewer, "csrf_token": viewer.csrf_token}


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` and multi-worker serving: settings from the environment."""
    return create_app(Settings())
