"""Request and response bodies of the management API (separate from the tables)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.connections import policy, scopes
from app.core.models import Connection, ConnectionEvent, ConnectLink, Tenant

Slug = Annotated[str, StringConstraints(min_length=2, max_length=63, pattern=r"^[a-z0-9][a-z0-9-]*[a-z0-9]$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class Strict(BaseModel):
    """Unknown fields are refused: no mass assignment of protected fields."""

    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    code: str = Field(examples=["tenant_not_found"])
    message: str = Field(examples=["No such tenant for this key."])


class ErrorOut(BaseModel):
    error: ErrorDetail


class BaaOut(BaseModel):
    signed: bool
    signed_at: datetime | None
    signed_by: str | None
    reference: str | None


class ConnectionOut(BaseModel):
    id: str
    status: str = Field(examples=["active"])
    kind: str = Field(examples=["oauth"])
    needs_reauth: bool
    scopes: list[str] = Field(examples=[["conversations:read", "teams:read"]])
    usable_scopes: list[str] = Field(description="Granted scopes usable now (PHI scopes drop out while a HIPAA tenant has no BAA)")
    access_expires_at: datetime | None
    last_refresh_at: datetime | None
    refresh_failures: int
    last_error: str | None
    connected_at: datetime | None
    salesmsg_org: str | None = Field(description="The Salesmsg org's name, when the grant let us read it")
    salesmsg_org_id: str | None = Field(description="The Salesmsg org's id, when the grant let us read it")
    salesmsg_user: str | None = Field(description="The Salesmsg user who connected (email, or name)")
    salesmsg_user_id: str | None

    @classmethod
    def of(cls, conn: Connection, tenant: Tenant) -> "ConnectionOut":
        granted = scopes.parse(conn.scopes)
        return cls(
            id=str(conn.id), status=conn.status, kind=conn.kind, needs_reauth=conn.status == "needs_reauth",
            scopes=granted, usable_scopes=policy.usable_scopes(conn.scopes, tenant=tenant, kind=conn.kind), access_expires_at=conn.access_expires_at,
            last_refresh_at=conn.last_refresh_at, refresh_failures=conn.refresh_failures, last_error=conn.last_error,
            connected_at=conn.connected_at, salesmsg_org=conn.salesmsg_org, salesmsg_org_id=conn.salesmsg_org_id,
            salesmsg_user=conn.salesmsg_user, salesmsg_user_id=conn.salesmsg_user_id,
        )


class TenantOut(BaseModel):
    id: str = Field(examples=["6f1c2a9e-2d47-4c1e-9a55-0f6a8f1d9b21"])
    slug: str = Field(examples=["acme-clinic"])
    name: str = Field(examples=["Acme Clinic"])
    hipaa: bool
    baa: BaaOut
    webhook_url: str | None
    connection: ConnectionOut | None
    created_at: datetime

    @classmethod
    def of(cls, tenant: Tenant, conn: Connection | None) -> "TenantOut":
        return cls(
            id=str(tenant.id), slug=tenant.slug, name=tenant.name, hipaa=tenant.hipaa,
            baa=BaaOut(signed=tenant.baa_signed_at is not None, signed_at=tenant.baa_signed_at,
                       signed_by=tenant.baa_signed_by, reference=tenant.baa_reference),
            webhook_url=tenant.webhook_url,
            connection=ConnectionOut.of(conn, tenant) if conn is not None else None,
            created_at=tenant.created_at,
        )


class TenantPageOut(BaseModel):
    data: list[TenantOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null on the last page")


class TenantCreate(Strict):
    slug: Slug = Field(examples=["acme-clinic"])
    name: Name = Field(examples=["Acme Clinic"])
    hipaa: bool = Field(default=True, description="Defaults to true: PHI stays blocked until a BAA is recorded")


class TenantUpdate(Strict):
    name: Name | None = None
    webhook_url: Annotated[str, StringConstraints(max_length=2000)] | None = Field(
        default=None, description="Set to receive connection events; empty string removes it", examples=["https://hooks.example.com/salesmsg"]
    )


class TenantUpdated(TenantOut):
    webhook_secret: str | None = Field(default=None, description="Shown once, when a webhook URL is set")


class HipaaIn(Strict):
    hipaa: bool


class BaaSignIn(Strict):
    reference: Annotated[str, StringConstraints(min_length=1, max_length=200)] = Field(examples=["BAA-2026-0142"])
    note: Annotated[str, StringConstraints(max_length=2000)] | None = None


class BaaRevokeIn(Strict):
    reason: Annotated[str, StringConstraints(max_length=500)] | None = None


class ConnectLinkOut(BaseModel):
    """A new connect link: its URL is shown only in this answer."""

    id: str = Field(description="The link's id, for listing, revoking and re-issuing it")
    url: str = Field(description="Shown once: send it to the org admin")
    expires_at: datetime
    replaces: str | None = Field(default=None, description="On a re-issue: the id of the link it replaces (now revoked)")


class ConnectLinkInfo(BaseModel):
    """A connect link as listed: its state, never its URL (stored only as a hash)."""

    id: str
    state: str = Field(description="outstanding, opened (not used yet), used, revoked or expired", examples=["opened"])
    created_at: datetime
    created_by: str
    expires_at: datetime
    first_opened_at: datetime | None = Field(description="Opening a link spends nothing (mail scanners open links too)")
    open_count: int
    used_at: datetime | None = Field(description="When a connection made through it completed")
    revoked_at: datetime | None
    revoked_by: str | None

    @classmethod
    def of(cls, link: ConnectLink, state: str) -> "ConnectLinkInfo":
        return cls(
            id=str(link.id), state=state, created_at=link.created_at, created_by=link.created_by,
            expires_at=link.expires_at, first_opened_at=link.first_opened_at, open_count=link.open_count or 0,
            used_at=link.used_at, revoked_at=link.revoked_at, revoked_by=link.revoked_by,
        )


class ConnectLinkListOut(BaseModel):
    data: list[ConnectLinkInfo] = Field(description="Newest first")


class EventOut(BaseModel):
    id: int
    type: str = Field(examples=["refreshed"])
    created_at: datetime
    payload: dict[str, Any]

    @classmethod
    def of(cls, event: ConnectionEvent) -> "EventOut":
        return cls(id=event.id, type=event.type, created_at=event.created_at, payload=event.payload)


class EventPageOut(BaseModel):
    data: list[EventOut]
    next_cursor: str | None


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "Bad request"},
    401: {"model": ErrorOut, "description": "Missing or invalid API key"},
    403: {"model": ErrorOut, "description": "The key may not do this"},
    404: {"model": ErrorOut, "description": "No such tenant for this key"},
    409: {"model": ErrorOut, "description": "Conflict with the current state"},
    422: {"model": ErrorOut, "description": "Invalid request"},
    503: {"model": ErrorOut, "description": "Database or Salesmsg unavailable"},
}
