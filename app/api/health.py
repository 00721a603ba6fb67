"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.core import metrics
from app.core.migrate import current_revision
from app.runtime import Runtime

router = APIRouter(include_in_schema=False)


@router.get("/healthz")
async def healthz() -> JSONResponse:
    """The process is up and serving."""
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """The database is reachable and migrated to the head revision this code expects."""
    runtime: Runtime = request.app.state.runtime
    try:
        revision = await asyncio.wait_for(current_revision(runtime.db.engine), timeout=3)
    except Exception as exc:  # noqa: BLE001 - any failure to reach the database means not ready
        return JSONResponse(
            {"status": "unavailable", "checks": {"database": "unreachable", "error": type(exc).__name__}},
            status_code=503,
        )
    if revision != runtime.migration_head:
        return JSONResponse(
            {
                "status": "unavailable",
                "checks": {"database": "ok", "migrations": "behind", "current": revision, "head": runtime.migration_head},
            },
            status_code=503,
        )
    return JSONResponse({"status": "ok", "checks": {"database": "ok", "migrations": revision}})


@router.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus exposition: requests, latency, refreshes, upstream status, proxy denials."""
    if not request.app.state.settings.metrics_enabled:
        return JSONResponse({"error": {"code": "not_found", "message": "Metrics are off."}}, status_code=404)
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
