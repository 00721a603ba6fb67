"""The HIPAA policy (pure): who may hold, request and call what, in every combination."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from app.connections import policy, scopes
from app.connections.view import ConnectionView, TenantAccess
from app.core.errors import BAA_REQUIRED_MESSAGE, Refusal

SIGNED = datetime(2026, 1, 1, tzinfo=UTC)
PHI, PLAIN = "messages:read", "teams:read"

# (hipaa, baa signed, connection kind) -> may PHI be requested, held and called
TABLE = [
    (False, False, "oauth", True),
    (False, True, "oauth", True),
    (True, True, "oauth", True),
    (True, False, "oauth", False),
    (True, False, "pat", True),
    (True, True, "pat", True),
    (False, False, "pat", True),
]


def access(*, hipaa: bool, baa: bool, kind: str = "oauth", status: str = "active", granted: str = f"{PHI} {PLAIN}",
           token: bytes | None = b"sealed") -> TenantAccess:
    tenant_id = uuid.uuid4()
    conn = ConnectionView(id=uuid.uuid4(), tenant_id=tenant_id, kind=kind, status=status, version=1, scopes=granted,
                          access_token_ct=token, access_expires_at=None)
    return TenantAccess(tenant_id=tenant_id, hipaa=hipaa, baa_signed_at=SIGNED if baa else None, connection=conn)


@pytest.mark.parametrize(("hipaa", "baa", "kind", "allowed"), TABLE)
def test_the_phi_table(hipaa, baa, kind, allowed):
    assert policy.phi_allowed(hipaa=hipaa, baa_signed_at=SIGNED if baa else None, kind=kind) is allowed
    assert policy.phi_blocked(access(hipaa=hipaa, baa=baa, kind=kind)) is not allowed
    # asking for it
    if allowed:
        assert policy.check_request([PHI, PLAIN], phi_allowed=allowed) == [PHI, PLAIN]
    else:
        with pytest.raises(policy.ScopeError) as info:
            policy.check_request([PHI, PLAIN], phi_allowed=allowed)
        assert (info.value.code, info.value.scopes) == ("baa_required", [PHI])
        assert policy.check_request([PLAIN], phi_allowed=allowed) == [PLAIN]
    # holding it
    assert (PHI in policy.usable([PHI, PLAIN], phi_allowed=allowed)) is allowed
    # calling it
    if allowed:
        policy.decide(access(hipaa=hipaa, baa=baa, kind=kind), PHI)
    else:
        with pytest.raises(Refusal) as refused:
            policy.decide(access(hipaa=hipaa, baa=baa, kind=kind), PHI)
        assert (refused.value.status_code, refused.value.code, refused.value.message) == (403, "baa_required", BAA_REQUIRED_MESSAGE)
    policy.decide(access(hipaa=hipaa, baa=baa, kind=kind), PLAIN)  # never gated


def test_a_tenant_is_hipaa_until_said_otherwise():
    from app.core.models import Tenant

    assert Tenant.__table__.c.hipaa.default.arg is True  # the column's default: fail closed


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"status": "disconnected"}, 409, "not_connected"),
        ({"token": None}, 409, "not_connected"),
        ({"status": "needs_reauth"}, 409, "connection_needs_reauth"),
        ({"granted": PLAIN}, 403, "insufficient_scope"),
    ],
)
def test_the_gate_refuses_before_the_phi_rule(kwargs, status, code):
    with pytest.raises(Refusal) as refused:
        policy.decide(access(hipaa=True, baa=False, **kwargs), PHI)
    assert (refused.value.status_code, refused.value.code) == (status, code)


def test_no_connection_is_not_connected_and_not_locked():
    none = TenantAccess(tenant_id=uuid.uuid4(), hipaa=True, baa_signed_at=None, connection=None)
    assert not policy.phi_blocked(none)
    with pytest.raises(Refusal) as refused:
        policy.decide(none, PLAIN)
    assert refused.value.code == "not_connected"


def test_every_phi_scope_is_in_the_catalogue_and_flagged():
    assert scopes.PHI_SCOPES <= scopes.ALL_SCOPES
    assert all(scopes.CATALOGUE[name].phi for name in scopes.PHI_SCOPES)


@pytest.mark.parametrize("scope", ["calls:read", "recordings:read", "recordings:write"])
def test_a_grant_holding_an_unlisted_phi_scope_is_gated_like_any_phi_scope(scope):
    granted = f"{scope} {PLAIN}"
    assert scopes.is_phi(scope)
    with pytest.raises(Refusal) as refused:
        policy.decide(access(hipaa=True, baa=False, granted=granted), scope)
    assert refused.value.code == "baa_required"
    policy.decide(access(hipaa=True, baa=True, granted=granted), scope)
    assert policy.usable([scope, PLAIN], phi_allowed=False) == [PLAIN]
