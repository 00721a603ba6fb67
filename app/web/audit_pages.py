"""The operator's audit log page, and its export as JSON lines.

The page and the export select rows through one ``audit_log.AuditFilter`` (tenant, actor, action
prefix, outcome, period), so the download holds what the page shows, oldest first and without a
page limit. The export is itself audited (``audit.export``) before its body streams. Names behind
ids (people, API keys, connect links, tenants) are read once per kind for a page, never per row.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import audit_log
from app.audit.audit_log import AuditFilter
from app.core.errors import NotFound
from app.core.models import AuditEntry
from app.deps import RequestIdDep, RuntimeDep, SessionDep
from app.tenants import registry
from app.web.viewer import ViewerDep, csrf_protect, render, require_operator

router = APIRouter(dependencies=[Depends(csrf_protect)], include_in_schema=False)

PAGE_SIZE = 50
OUTCOMES = ("success", "denied", "failure")


@dataclass(frozen=True, slots=True)
class FilterForm:
    """The filters as typed (echoed into the form, the pager and the export), and what they select."""

    values: dict[str, str]
    selection: AuditFilter
    problem: str | None = None

    @property
    def query(self) -> str:
        return urlencode({k: v for k, v in self.values.items() if v})


def _day(text: str, label: str) -> tuple[date | None, str | None]:
    if not text:
        return None, None
    try:
        return date.fromisoformat(text), None
    except ValueError:
        return None, f"“{label}” is not a date (YYYY-MM-DD)."


async def _filters(session: AsyncSession, *, tenant: str, actor: str, action: str, outcome: str,
                   since: str, until: str) -> FilterForm:
    values = {"tenant": tenant.strip(), "actor": actor.strip(), "action": action.strip(), "outcome": outcome,
              "from": since, "to": until}
    problems: list[str] = []
    tenant_id, no_tenant = None, False
    if values["tenant"]:
        try:
            tenant_id = (await registry.get_tenant(session, values["tenant"])).id
        except NotFound:
            no_tenant = True
            problems.append(f"No tenant is called “{values['tenant']}”.")
    first, problem_from = _day(since, "From")
    last, problem_to = _day(until, "To")
    problems += [p for p in (problem_from, problem_to) if p]
    if first and last and first > last:
        problems.append("“From” is after “To”.")
    actor_ids = await audit_log.actor_ids_matching(session, values["actor"]) if values["actor"] else frozenset()
    selection = AuditFilter(
        tenant_id=tenant_id, no_tenant=no_tenant, actor_text=values["actor"], actor_ids=actor_ids,
        action_prefix=values["action"], outcome=outcome,
        since=datetime.combine(first, time(), UTC) if first else None,
        until=datetime.combine(last + timedelta(days=1), time(), UTC) if last else None,
    )
    return FilterForm(values, selection, " ".join(problems) or None)


Tenant = Annotated[str, Query(max_length=63)]
ActorText = Annotated[str, Query(max_length=200)]
Action = Annotated[str, Query(max_length=64, pattern=r"^[a-z_.]*$")]
Outcome = Annotated[str, Query(pattern="^(success|denied|failure)?$")]
Since = Annotated[str, Query(alias="from", max_length=10)]
Until = Annotated[str, Query(alias="to", max_length=10)]


def _row(row: AuditEntry, names: audit_log.Names) -> dict[str, Any]:
    at = row.at.astimezone(UTC)
    fields = ([("target", row.target)] if row.target else []) + audit_log.detail_fields(row.details)
    if row.request_id:
        fields.append(("request", row.request_id))
    return {
        "id": row.id, "iso": at.isoformat(), "short": at.strftime("%Y-%m-%d %H:%M:%S"),
        "full": at.strftime("%Y-%m-%d %H:%M:%S.%f UTC"), "actor": names.actor(row), "actor_type": row.actor_type,
        "tenant": names.tenant(row.tenant_id), "tenant_id": row.tenant_id, "action": row.action,
        "action_words": audit_log.action_words(row.action), "outcome": row.outcome, "fields": fields,
        "fields_text": "; ".join(f"{k}: {v}" for k, v in fields),
    }


@router.get("/audit")
async def audit_page(
    request: Request,
    session: SessionDep,
    viewer: ViewerDep,
    tenant: Tenant = "",
    actor: ActorText = "",
    action: Action = "",
    outcome: Outcome = "",
    since: Since = "",
    until: Until = "",
    before: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
    after: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,
) -> Response:
    require_operator(viewer)
    form = await _filters(session, tenant=tenant, actor=actor, action=action, outcome=outcome, since=since, until=until)
    where = form.selection.clauses()
    rows: list[AuditEntry] = []
    newer = older = None
    if form.problem is None:
        if after is not None:  # newer than a page: read upwards, show newest first
            found = list((await session.scalars(
                select(AuditEntry).where(AuditEntry.id > after, *where).order_by(AuditEntry.id).limit(PAGE_SIZE + 1)
            )).all())
            rows = found[:PAGE_SIZE][::-1]
            has_newer = len(found) > PAGE_SIZE
            has_older = bool(rows) and await _exists(session, where, AuditEntry.id < rows[-1].id)
        else:
            query = select(AuditEntry).where(*where).order_by(AuditEntry.id.desc()).limit(PAGE_SIZE + 1)
            if before is not None:
                query = query.where(AuditEntry.id < before)
            found = list((await session.scalars(query)).all())
            rows = found[:PAGE_SIZE]
            has_older = len(found) > PAGE_SIZE
            has_newer = before is not None and await _exists(session, where, AuditEntry.id >= before)
        if rows:
            older = rows[-1].id if has_older else None
            newer = rows[0].id if has_newer else None
    names = await audit_log.names_for(session, rows)
    return render(request, viewer, "audit.html", status_code=422 if form.problem else 200,
                  rows=[_row(r, names) for r in rows], form=form.values, query=form.query, problem=form.problem,
                  outcomes=OUTCOMES, older=older, newer=newer)


async def _exists(session: AsyncSession, where: list[Any], condition: Any) -> bool:
    return await session.scalar(select(AuditEntry.id).where(condition, *where).limit(1)) is not None


@router.get("/audit/export")
async def audit_export(
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
    viewer: ViewerDep,
    request_id: RequestIdDep,
    tenant: Tenant = "",
    actor: ActorText = "",
    action: Action = "",
    outcome: Outcome = "",
    since: Since = "",
    until: Until = "",
) -> Response:
    """The page's rows (all of them, oldest first) as JSON lines, one ``audit_log.as_dict`` a line;
    the same lines as the management API's export."""
    require_operator(viewer)
    form = await _filters(session, tenant=tenant, actor=actor, action=action, outcome=outcome, since=since, until=until)
    if form.problem:
        return await audit_page(request, session, viewer, tenant=tenant, actor=actor, action=action, outcome=outcome,
                                since=since, until=until)
    where = form.selection.clauses()
    await audit_log.record(session, "audit.export", viewer.actor(), tenant_id=form.selection.tenant_id,
                           target="/audit/export", request_id=request_id or None,
                           details={k: v for k, v in form.values.items() if v})

    async def lines() -> AsyncIterator[bytes]:
        # Its own read-only session: the request's unit of work (with the audit row) is committed
        # before the body streams.
        async with runtime.db.sessionmaker() as reader:
            async for entry in audit_log.export_rows(reader, where=where):
                yield json.dumps(entry, separators=(",", ":")).encode() + b"\n"

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return StreamingResponse(lines(), media_type="application/x-ndjson", headers={
        "Content-Disposition": f'attachment; filename="audit-{stamp}.jsonl"', "Cache-Control": "no-store",
    })
