"""The operator's API key pages: list, create (the key shown once), revoke (confirmed in the page)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.errors import AppError
from app.core.models import ApiKeyTenant, Tenant
from app.deps import RequestIdDep, SessionDep
from app.identity import api_keys
from app.web.viewer import ViewerDep, csrf_protect, redirect, render, require_operator, safe_next

router = APIRouter(dependencies=[Depends(csrf_protect)], include_in_schema=False)


async def _listing(session: AsyncSession) -> dict[str, Any]:
    """The keys, and the tenant slugs of each key limited to some tenants (one query for all)."""
    rows = await api_keys.list_keys(session)
    scoped: dict[uuid.UUID, list[str]] = {}
    pairs = await session.execute(
        select(ApiKeyTenant.api_key_id, Tenant.slug).join(Tenant, Tenant.id == ApiKeyTenant.tenant_id).order_by(Tenant.slug)
    )
    for key_id, slug in pairs.all():
        scoped.setdefault(key_id, []).append(slug)
    return {"rows": rows, "scoped": scoped}


@router.get("/api-keys")
async def api_keys_page(request: Request, session: SessionDep, viewer: ViewerDep) -> Response:
    require_operator(viewer)
    return render(request, viewer, "api_keys.html", **await _listing(session))


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
        return render(request, viewer, "api_keys.html", status_code=exc.status_code, error=exc.message,
                      **await _listing(session))
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
