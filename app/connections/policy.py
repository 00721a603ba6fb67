"""Who may hold, request and call what under HIPAA: the one place the BAA rule is written.

The rule: on a HIPAA tenant, a PHI scope (``scopes.PHI_SCOPES``) needs a BAA that an operator
has recorded as signed. Until then it cannot be asked for (consent screen, authorize, callback),
a grant that holds it cannot use it, and no PHI endpoint may be called (proxy or dashboard).

| tenant | BAA | connection | PHI scopes |
| --- | --- | --- | --- |
| not HIPAA | any | any | allowed |
| HIPAA (the default: fail closed) | signed | OAuth | allowed |
| HIPAA | not signed | OAuth | refused: ``baa_required`` |
| any | any | personal access token | allowed: an org member's own access, which Salesmsg does not gate |

Every answer comes from the tenant row as the database holds it now (so revoking a BAA takes
effect on the next request in every process), never from what a request says. Pure: no I/O.

What may be asked for at all is narrower than what is known: ``calls:read``, ``recordings:read``
and ``recordings:write`` (``scopes.UNLISTED_PHI_SCOPES``) are not in Salesmsg's scope table, so
asking for them may fail the whole authorization; ``check_request`` refuses them
(``scope_not_offered``) unless the operator turned ``SMC_OFFER_UNLISTED_PHI_SCOPES`` on. A grant
that holds them anyway is PHI like any other (``decide``, ``usable``).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from app.connections import scopes
from app.connections.view import DISCONNECTED, NEEDS_REAUTH, PAT, TenantAccess
from app.core.errors import (
    BAA_REQUIRED_MESSAGE,
    AppError,
    Forbidden,
    Refusal,
    ValidationFailed,
)
from app.core.models import Tenant


class ScopeError(ValueError):
    """A requested scope set breaks a rule; ``code`` is the stable error code."""

    def __init__(self, code: str, message: str, scopes: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.scopes = sorted(scopes)

    def as_app_error(self) -> AppError:
        """How the consent screen and the API answer it."""
        if self.code == "baa_required":
            return Forbidden(
                str(self), code="baa_required", extra={"scopes": self.scopes},
                hint="An operator must record the signed BAA for this organization before PHI scopes can be granted.",
            )
        return ValidationFailed(str(self), code=self.code, extra={"scopes": self.scopes})


def phi_allowed(*, hipaa: bool, baa_signed_at: datetime | None, kind: str | None = None) -> bool:
    """PHI scopes may be held and used: not HIPAA, a signed BAA, or a personal access token."""
    return kind == PAT or not hipaa or baa_signed_at is not None


def tenant_phi_allowed(tenant: Tenant, *, kind: str | None = None) -> bool:
    return phi_allowed(hipaa=tenant.hipaa, baa_signed_at=tenant.baa_signed_at, kind=kind)


def phi_blocked(access: TenantAccess) -> bool:
    """The tenant's connection exists and may not touch PHI right now (the dashboard's locked state)."""
    conn = access.connection
    return conn is not None and not phi_allowed(hipaa=access.hipaa, baa_signed_at=access.baa_signed_at, kind=conn.kind)


def check_request(requested: Iterable[str], *, phi_allowed: bool, offer_unlisted: bool = False) -> list[str]:
    """The scopes one may ask for: known, offered (``scopes.offered``), at least one, and no PHI
    unless ``phi_allowed``."""
    chosen = scopes.parse(list(requested))
    unknown = [s for s in chosen if s not in scopes.ALL_SCOPES]
    if unknown:
        raise ScopeError("unknown_scope", "Unknown scope: " + ", ".join(unknown), unknown)
    not_offered = [s for s in chosen if s not in scopes.offered(unlisted=offer_unlisted)]
    if not_offered:
        raise ScopeError(
            "scope_not_offered",
            "Not offered (Salesmsg's scope table does not list it; an operator can turn on "
            "SMC_OFFER_UNLISTED_PHI_SCOPES): " + ", ".join(not_offered),
            not_offered,
        )
    if not chosen:
        raise ScopeError("no_scope", "Choose at least one scope.")
    phi = [s for s in chosen if scopes.is_phi(s)]
    if phi and not phi_allowed:
        raise ScopeError(
            "baa_required",
            "PHI scopes need a signed Business Associate Agreement for this HIPAA organization: " + ", ".join(phi),
            phi,
        )
    return chosen


def requestable(requested: Iterable[str], *, tenant: Tenant, kind: str, offer_unlisted: bool = False) -> list[str]:
    """``check_request`` against the tenant's current BAA state, for a connection of ``kind``."""
    return check_request(requested, phi_allowed=tenant_phi_allowed(tenant, kind=kind), offer_unlisted=offer_unlisted)


def offered_defaults(raw: str, *, offer_unlisted: bool) -> list[str]:
    """The configured default scopes (``SMC_DEFAULT_SCOPES``) that may be offered: an unknown or
    unoffered scope there is dropped, never preselected nor requested."""
    allowed = scopes.offered(unlisted=offer_unlisted)
    return [s for s in scopes.parse(raw) if s in allowed]


def usable(granted: Iterable[str], *, phi_allowed: bool) -> list[str]:
    """Granted scopes that may be used right now (PHI ones drop out while PHI is not allowed)."""
    return [s for s in granted if phi_allowed or not scopes.is_phi(s)]


def usable_scopes(raw: str | None, *, tenant: Tenant, kind: str) -> list[str]:
    """The connection's granted scopes (as stored) that may be used now, in catalogue order."""
    return usable(scopes.parse(raw), phi_allowed=tenant_phi_allowed(tenant, kind=kind))


_SCOPE_SETS: dict[str, frozenset[str]] = {}


def _granted(raw: str) -> frozenset[str]:
    """The stored scope string as a set; remembered, since a tenant's grant rarely changes."""
    found = _SCOPE_SETS.get(raw)
    if found is None:
        found = frozenset(raw.split())
        if len(_SCOPE_SETS) < 10_000:
            _SCOPE_SETS[raw] = found
    return found


def decide(access: TenantAccess, scope: str) -> None:
    """The gate for one call needing ``scope``: raise its refusal, or return when it may go to Salesmsg."""
    conn = access.connection
    if conn is None or conn.status == DISCONNECTED or conn.access_token_ct is None:
        raise Refusal(409, "not_connected", "The tenant has no active Salesmsg connection.")
    if conn.status == NEEDS_REAUTH:
        raise Refusal(409, "connection_needs_reauth", "The tenant's Salesmsg connection must be reconnected.")
    if scope not in _granted(conn.scopes):
        raise Refusal(403, "insufficient_scope", f"The connection was not granted {scope}.")
    if scopes.is_phi(scope) and not phi_allowed(hipaa=access.hipaa, baa_signed_at=access.baa_signed_at, kind=conn.kind):
        raise Refusal(403, "baa_required", BAA_REQUIRED_MESSAGE)
