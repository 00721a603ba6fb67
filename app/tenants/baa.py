"""Business Associate Agreements: an operator records one as signed, or revokes it.

The gate reads the tenant's current row on every request, so a revocation blocks PHI on the
next request in every process. Both actions are audited in the same transaction.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import audit_log
from app.audit.audit_log import Actor
from app.core.errors import Conflict, ValidationFailed
from app.core.models import Tenant


def _clean(value: str | None, *, limit: int, name: str, required: bool = False) -> str | None:
    value = " ".join((value or "").split())
    if required and not value:
        raise ValidationFailed(f"The {name} is required.", code=f"missing_{name}", extra={"fields": [{"field": name, "problem": "required"}]})
    if len(value) > limit:
        raise ValidationFailed(f"The {name} is at most {limit} characters.", code=f"invalid_{name}")
    return value or None


async def sign(
    session: AsyncSession,
    tenant: Tenant,
    *,
    reference: str,
    note: str | None = None,
    signed_by: str,
    actor: Actor,
    request_id: str | None = None,
) -> Tenant:
    """Record the BAA as signed: who, when, and the agreement's reference."""
    reference_clean = _clean(reference, limit=200, name="reference", required=True)
    note_clean = _clean(note, limit=2000, name="note")
    if tenant.baa_signed_at is not None:
        raise Conflict("The BAA is already recorded as signed; revoke it first to replace it.", code="baa_already_signed")
    tenant.baa_signed_at = datetime.now(UTC)
    tenant.baa_signed_by = signed_by
    tenant.baa_reference = reference_clean
    tenant.baa_note = note_clean
    await audit_log.record(
        session, "baa.sign", actor, tenant_id=tenant.id, target=tenant.slug, request_id=request_id,
        details={"reference": reference_clean},
    )
    return tenant


async def revoke(
    session: AsyncSession,
    tenant: Tenant,
    *,
    reason: str | None = None,
    actor: Actor,
    request_id: str | None = None,
) -> Tenant:
    """Revoke the BAA: PHI scopes and endpoints are blocked from the next request on."""
    reason_clean = _clean(reason, limit=500, name="reason")
    if tenant.baa_signed_at is None:
        raise Conflict("No BAA is recorded for this tenant.", code="baa_not_signed")
    previous = tenant.baa_reference
    tenant.baa_signed_at = None
    tenant.baa_signed_by = None
    tenant.baa_reference = None
    tenant.baa_note = None
    await audit_log.record(
        session, "baa.revoke", actor, tenant_id=tenant.id, target=tenant.slug, request_id=request_id,
        details={"reference": previous, "reason": reason_clean},
    )
    return tenant
