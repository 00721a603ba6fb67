"""The operator's audit log page."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from sqlalchemy import select

from app.audit import audit_log
from app.core.errors import AppError
from app.core.models import AuditEntry, Tenant
from app.deps import SessionDep
from app.tenants import registry
from app.web.viewer import ViewerDep, csrf_protect, render, require_operator

router = APIRouter(dependencies=[Depends(csrf_protect)], include_in_schema=False)


@router.get("/audit")
async def audit_page(
    request: Request,
    session: SessionDep,
    viewer: ViewerDep,
    tenant: Annotated[str | None, Query(max_length=63)] = None,
    action: Annotated[str | None, Query(max_length=64, pattern=r"^[a-z_.]*$")] = None,
    outcome: Annotated[str | None, Query(pattern="^(success|denied|failure)?$")] = None,
    before: Annotated[int | None, Query(ge=1)] = None,
) -> Response:
    require_operator(viewer)
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(51)
    tenant_row = None
    if tenant:
        try:
            tenant_row = await registry.get_tenant(session, tenant)
        except AppError:
            tenant_row = None
        query = query.where(AuditEntry.tenant_id == (tenant_row.id if tenant_row else None))
    if action:
        query = query.where(AuditEntry.action.startswith(action, autoescape=True))
    if outcome:
        query = query.where(AuditEntry.outcome == outcome)
    if before:
        query = query.where(AuditEntry.id < before)
    rows = list((await session.scalars(query)).all())
    slugs = {t.id: t.slug for t in (await session.scalars(select(Tenant).where(Tenant.id.in_({r.tenant_id for r in rows if r.tenant_id})))).all()}
    return render(request, viewer, "audit.html", rows=rows[:50], more=rows[49].id if len(rows) > 50 else None,
                  slugs=slugs, filters={"tenant": tenant or "", "action": action or "", "outcome": outcome or ""},
                  as_dict=audit_log.as_dict)
