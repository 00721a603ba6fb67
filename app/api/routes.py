"""Management API routes: tenants, HIPAA and BAA, connections, connect links, events, audit export."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response, StreamingResponse
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.api.auth import CallerDep, OperatorDep, WriterDep, tenant_of
from app.api.schemas import (
    ERRORS,
    BaaRevokeIn,
    BaaSignIn,
    ConnectionOut,
    ConnectLinkInfo,
    ConnectLinkListOut,
    ConnectLinkOut,
    EventOut,
    EventPageOut,
    HipaaIn,
    TenantCreate,
    TenantOut,
    TenantPageOut,
    TenantUpdate,
    TenantUpdated,
)
from app.audit import audit_log
from app.connections import events, links, store, transitions, webhooks
from app.connections.refresh import ConnectionNeedsReauth, NotConnected
from app.connections.view import ACTIVE, NEEDS_REAUTH
from app.core.errors import NotFound, ValidationFailed
from app.core.models import ConnectionEvent, Tenant
from app.deps import RequestIdDep, RuntimeDep, SessionDep
from app.tenants import baa, registry

router = APIRouter(prefix="/api/v1", responses=ERRORS)
TenantRef = Annotated[str, "tenant id or slug"]


async def _tenant_out(session: AsyncSession, tenant: Tenant) -> TenantOut:
    return TenantOut.of(tenant, await store.get_connection(session, tenant.id))


@router.get("/tenants", response_model=TenantPageOut, tags=["tenants"], summary="List tenants the key covers")
async def list_tenants(
    session: SessionDep,
    caller: CallerDep,
    search: Annotated[str | None, Query(max_length=100, description="Part of the name or slug")] = None,
    status: Annotated[str | None, Query(pattern="^(active|needs_reauth|not_connected)$")] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> TenantPageOut:
    page = await registry.list_tenants(session, search=search, cursor=cursor, limit=limit, tenant_ids=caller.tenant_ids, status=status)
    return TenantPageOut(data=[TenantOut.of(r.tenant, r.connection) for r in page.rows], next_cursor=page.next_cursor)


@router.post("/tenants", response_model=TenantOut, status_code=201, tags=["tenants"], summary="Create a tenant (operator key)")
async def create_tenant(
    body: TenantCreate, session: SessionDep, runtime: RuntimeDep, caller: OperatorDep, request_id: RequestIdDep
) -> TenantOut:
    tenant = await registry.create_tenant(
        session, keyring=runtime.keyring, slug=body.slug, name=body.name, hipaa=body.hipaa,
        actor=caller.actor, request_id=request_id,
    )
    return TenantOut.of(tenant, None)


@router.get("/tenants/{tenant}", response_model=TenantOut, tags=["tenants"], summary="Get a tenant by id or slug")
async def get_tenant(tenant: TenantRef, session: SessionDep, caller: CallerDep) -> TenantOut:
    row = await tenant_of(session, caller, tenant)
    return await _tenant_out(session, row)


@router.patch("/tenants/{tenant}", response_model=TenantUpdated, tags=["tenants"],
              summary="Rename a tenant or set its webhook URL (HIPAA and BAA have their own endpoints)")
async def update_tenant(
    tenant: TenantRef, body: TenantUpdate, session: SessionDep, runtime: RuntimeDep, caller: WriterDep, request_id: RequestIdDep
) -> TenantUpdated:
    row = await tenant_of(session, caller, tenant, for_update=True)
    secret = None
    if body.name is not None:
        await registry.rename(session, row, name=body.name, actor=caller.actor, request_id=request_id)
    if body.webhook_url is not None:
        secret = await webhooks.set_webhook(session, runtime.data_keys, row, url=body.webhook_url or None,
                                            actor=caller.actor, request_id=request_id)
    out = await _tenant_out(session, row)
    return TenantUpdated(**out.model_dump(), webhook_secret=secret)


@router.delete("/tenants/{tenant}", status_code=204, tags=["tenants"],
               summary="Delete a tenant; its data key is shredded with it (operator key)")
async def delete_tenant(tenant: TenantRef, session: SessionDep, caller: OperatorDep, request_id: RequestIdDep) -> Response:
    row = await tenant_of(session, caller, tenant, for_update=True)
    await registry.delete_tenant(session, row, actor=caller.actor, request_id=request_id)
    return Response(status_code=204)


@router.put("/tenants/{tenant}/hipaa", response_model=TenantOut, tags=["hipaa"], summary="Set the HIPAA flag (operator key)")
async def set_hipaa(
    tenant: TenantRef, body: HipaaIn, session: SessionDep, caller: OperatorDep, request_id: RequestIdDep
) -> TenantOut:
    row = await tenant_of(session, caller, tenant, for_update=True)
    await registry.set_hipaa(session, row, hipaa=body.hipaa, actor=caller.actor, request_id=request_id)
    return await _tenant_out(session, row)


@router.post("/tenants/{tenant}/baa", response_model=TenantOut, tags=["hipaa"], summary="Record the BAA as signed (operator key)")
async def sign_baa(
    tenant: TenantRef, body: BaaSignIn, session: SessionDep, caller: OperatorDep, request_id: RequestIdDep
) -> TenantOut:
    row = await tenant_of(session, caller, tenant, for_update=True)
    await baa.sign(session, row, reference=body.reference, note=body.note, signed_by=f"api key {caller.key.name}",
                   actor=caller.actor, request_id=request_id)
    return await _tenant_out(session, row)


@router.post("/tenants/{tenant}/baa/revoke", response_model=TenantOut, tags=["hipaa"],
             summary="Revoke the BAA: PHI is blocked from the next request (operator key)")
async def revoke_baa(
    tenant: TenantRef, body: BaaRevokeIn, session: SessionDep, caller: OperatorDep, request_id: RequestIdDep
) -> TenantOut:
    row = await tenant_of(session, caller, tenant, for_update=True)
    await baa.revoke(session, row, reason=body.reason, actor=caller.actor, request_id=request_id)
    return await _tenant_out(session, row)


@router.get("/tenants/{tenant}/connection", response_model=ConnectionOut, tags=["connections"],
            summary="Connection status, granted scopes, expiry, last refresh")
async def get_connection(tenant: TenantRef, session: SessionDep, caller: CallerDep) -> ConnectionOut:
    row = await tenant_of(session, caller, tenant)
    return ConnectionOut.of(await store.require_connection(session, row.id), row)


@router.post("/tenants/{tenant}/connection/refresh", response_model=ConnectionOut, tags=["connections"],
             summary="Refresh the token now (once, even with many callers)")
async def force_refresh(tenant: TenantRef, session: SessionDep, runtime: RuntimeDep, caller: WriterDep) -> ConnectionOut:
    row = await tenant_of(session, caller, tenant)
    conn = await store.require_connection(session, row.id)
    if conn.status != ACTIVE:
        raise ConnectionNeedsReauth() if conn.status == NEEDS_REAUTH else NotConnected()
    await runtime.refresher.force_refresh(conn.id, seen_version=conn.version)
    await session.refresh(conn)
    return ConnectionOut.of(conn, row)


@router.delete("/tenants/{tenant}/connection", response_model=ConnectionOut, tags=["connections"],
               summary="Disconnect: the tokens are destroyed")
async def disconnect(tenant: TenantRef, session: SessionDep, caller: WriterDep, request_id: RequestIdDep) -> ConnectionOut:
    row = await tenant_of(session, caller, tenant)
    conn = await transitions.disconnected(session, tenant=row, actor=caller.actor, request_id=request_id)
    return ConnectionOut.of(conn, row)


@router.post("/tenants/{tenant}/connect-links", response_model=ConnectLinkOut, status_code=201, tags=["connections"],
             summary="A single-use, expiring link for the org admin (shown once)")
async def create_connect_link(
    tenant: TenantRef, session: SessionDep, runtime: RuntimeDep, caller: WriterDep, request_id: RequestIdDep
) -> ConnectLinkOut:
    row = await tenant_of(session, caller, tenant)
    link, token = await links.create_connect_link(
        session, tenant=row, hours=runtime.settings.connect_link_hours, actor=caller.actor, request_id=request_id
    )
    return ConnectLinkOut(id=str(link.id), url=f"{runtime.settings.public_url}/connect/{token}", expires_at=link.expires_at)


@router.get("/tenants/{tenant}/connect-links", response_model=ConnectLinkListOut, tags=["connections"],
            summary="The tenant's connect links with their state (never their URLs)")
async def list_connect_links(
    tenant: TenantRef, session: SessionDep, caller: WriterDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 100,
) -> ConnectLinkListOut:
    row = await tenant_of(session, caller, tenant)
    rows = await links.list_links(session, tenant_id=row.id, limit=limit)
    return ConnectLinkListOut(data=[ConnectLinkInfo.of(link, links.state_of(link)) for link in rows])


@router.post("/tenants/{tenant}/connect-links/{link_id}/revoke", response_model=ConnectLinkInfo, tags=["connections"],
             summary="Revoke a link not used yet; browsers that opened it can no longer connect")
async def revoke_connect_link(
    tenant: TenantRef, link_id: uuid.UUID, session: SessionDep, caller: WriterDep, request_id: RequestIdDep
) -> ConnectLinkInfo:
    row = await tenant_of(session, caller, tenant)
    link = await links.revoke(session, tenant=row, link_id=link_id, actor=caller.actor, request_id=request_id)
    return ConnectLinkInfo.of(link, links.state_of(link))


@router.post("/tenants/{tenant}/connect-links/{link_id}/reissue", response_model=ConnectLinkOut, status_code=201,
             tags=["connections"], summary="Revoke a link (if it still works) and issue a new one (shown once)")
async def reissue_connect_link(
    tenant: TenantRef, link_id: uuid.UUID, session: SessionDep, runtime: RuntimeDep, caller: WriterDep,
    request_id: RequestIdDep,
) -> ConnectLinkOut:
    row = await tenant_of(session, caller, tenant)
    link, token = await links.reissue(session, tenant=row, link_id=link_id, hours=runtime.settings.connect_link_hours,
                                      actor=caller.actor, request_id=request_id)
    return ConnectLinkOut(id=str(link.id), url=f"{runtime.settings.public_url}/connect/{token}",
                          expires_at=link.expires_at, replaces=str(link_id))


def _event_cursor(event_id: int) -> str:
    return base64.urlsafe_b64encode(str(event_id).encode()).decode().rstrip("=")


def _decode_event_cursor(cursor: str | None) -> int | None:
    if not cursor:
        return None
    try:
        value = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if value.isdigit() and len(value) < 19:
            return int(value)
    except (ValueError, UnicodeDecodeError):
        pass
    raise ValidationFailed("The cursor is not valid.", code="invalid_cursor")


@router.get("/tenants/{tenant}/events", response_model=EventPageOut, tags=["connections"],
            summary="Connection events, newest first")
async def list_events(
    tenant: TenantRef,
    session: SessionDep,
    caller: CallerDep,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> EventPageOut:
    row = await tenant_of(session, caller, tenant)
    rows = await events.recent(session, tenant_id=row.id, limit=limit + 1, before_id=_decode_event_cursor(cursor))
    page = rows[:limit]
    return EventPageOut(data=[EventOut.of(e) for e in page],
                        next_cursor=_event_cursor(page[-1].id) if len(rows) > limit else None)


@router.get(
    "/audit",
    tags=["audit"],
    summary="Export the audit log as JSON lines (operator key)",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {"schema": {"type": "string"}}}, "description": "One JSON object a line"}},
)
async def export_audit(
    session: SessionDep,
    runtime: RuntimeDep,
    caller: OperatorDep,
    tenant: Annotated[str | None, Query(max_length=63, description="Tenant id or slug")] = None,
    since: Annotated[datetime | None, Query(description="From this time (inclusive), ISO 8601 with a zone")] = None,
    until: Annotated[datetime | None, Query(description="Until this time (exclusive)")] = None,
) -> StreamingResponse:
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise ValidationFailed(f"'{name}' needs a time zone, e.g. 2026-11-26T00:00:00Z.", code="invalid_time")
    tenant_id = (await tenant_of(session, caller, tenant)).id if tenant else None

    async def lines() -> AsyncIterator[bytes]:
        # Its own read-only session: the request's unit of work ends before the body streams.
        async with runtime.db.sessionmaker() as reader:
            async for row in audit_log.export_rows(reader, tenant_id=tenant_id, since=since, until=until):
                yield json.dumps(row, separators=(",", ":")).encode() + b"\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.get("/tenants/{tenant}/events/{event_id}", response_model=EventOut, tags=["connections"], summary="One event")
async def get_event(tenant: TenantRef, event_id: Annotated[int, Path(ge=1, le=2**63 - 1)], session: SessionDep, caller: CallerDep) -> EventOut:
    row = await tenant_of(session, caller, tenant)
    event = await session.scalar(select(ConnectionEvent).where(ConnectionEvent.id == event_id, ConnectionEvent.tenant_id == row.id))
    if event is None:
        raise NotFound("No such event.", code="event_not_found")
    return EventOut.of(event)
