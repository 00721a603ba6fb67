"""The operator's API key pages."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response
from sqlalchemy import select

from app.core.errors import AppError
from app.core.models import Tenant
from app.deps import RequestIdDep, SessionDep
from app.identity import api_keys
from app.web.viewer import ViewerDep, csrf_protect, redirect, render, require_operator, safe_next

router = APIRouter(dependencies=[Depends(csrf_protect)], include_in_schema=False)


@router.get("/api-keys")
async def api_keys_page(request: Request, session: SessionDep, viewer: ViewerDep) -> Response:
    require_operator(viewer)
    rows = await api_keys.list_keys(session)
    scoped = {}
    for row in rows:
        if not row.all_tenants:
            ids = await api_keys.covered_tenant_ids(session, row) or set()
            scoped[row.id] = sorted(
                (await session.scalars(select(Tenant.slug).where(Tenant.id.in_(ids)))).all()
            )
    return render(request, viewer, "api_keys.html", rows=rows, scoped=scoped)


@router.post("/api-keys")
async def create_api_key(
    request: Request,
    session: SessionDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
    name: Annotated[str, Form(max_length=200)] = "",
    tenant: Annotated[str, Form(max_length=63)] = "",
    read_only: Annotated[str, Form(max_length=10)] = "",
    operator: Annotated[str, Form(max_length=10)] = "",
) -> Response:
    require_operator(viewer)
    try:
        row, key = await api_keys.create_api_key(
            session, name=name, tenant_refs=[tenant] if tenant else None, read_only=read_only == "yes",
            operator=operator == "yes", actor=viewer.actor(), request_id=request_id,
        )
    except AppError as exc:
        rows = await api_keys.list_keys(session)
        return render(request, viewer, "api_keys.html", status_code=exc.status_code, rows=rows, scoped={}, error=exc.message)
    back = f"/t/{tenant}#api-keys" if tenant else "/api-keys"
    return render(request, viewer, "key_created.html", key=key, row=row, tenant_slug=tenant or None, back=back)


@router.post("/api-keys/{key_id}/revoke")
async def revoke_api_key(
    key_id: uuid.UUID,
    session: SessionDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
    back: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    require_operator(viewer)
    await api_keys.revoke_api_key(session, key_id=key_id, actor=viewer.actor(), request_id=request_id)
    return redirect(safe_next(back, "/api-keys"))
