"""The scope catalogue and the rules for asking for scopes (pure, no database)."""

from __future__ import annotations

import pytest

from app.connections import policy, scopes


def test_catalogue_covers_the_documented_table_plus_calls_and_recordings():
    documented = {
        "contacts", "conversations", "messages", "saved-replies", "teams", "users", "tags", "custom-fields",
        "attachments", "billing", "broadcasts", "broadcasts-recurring", "toll-free", "contact-imports",
        "integrations", "conversions", "follow-ups", "groups", "keywords", "numbers", "numbers-landline",
        "off-hours", "organizations-agency", "organizations", "organizations-invitations", "role-permissions",
        "triggers", "opt-in-data-files", "call-history", "voice", "website-chat",
    }
    for resource in documented:
        assert f"{resource}:read" in scopes.ALL_SCOPES
        assert f"{resource}:write" in scopes.ALL_SCOPES
    assert {"calls:read", "recordings:read", "recordings:write"} <= scopes.ALL_SCOPES
    assert len(scopes.ALL_SCOPES) == 2 * len(documented) + 3
    # the table is what is offered: 31 resources with read and write, no catch-all
    assert scopes.TABLE_SCOPES == {f"{r}:{a}" for r in documented for a in ("read", "write")}
    assert len(scopes.TABLE_SCOPES) == 62
    assert scopes.UNLISTED_PHI_SCOPES == {"calls:read", "recordings:read", "recordings:write"}


def test_the_unlisted_phi_scopes_are_offered_only_when_turned_on():
    assert scopes.offered(unlisted=False) == scopes.TABLE_SCOPES
    assert scopes.offered(unlisted=True) == scopes.ALL_SCOPES
    shown = {s.name for g in scopes.grouped() for s in g.scopes}
    assert shown == scopes.TABLE_SCOPES
    assert {s.name for g in scopes.grouped(unlisted=True) for s in g.scopes} == scopes.ALL_SCOPES
    assert all(scopes.is_phi(s) for s in scopes.UNLISTED_PHI_SCOPES)  # PHI wherever a grant holds them


@pytest.mark.parametrize("scope", ["calls:read", "recordings:read", "recordings:write"])
def test_asking_for_an_unlisted_scope_is_refused_unless_offered(scope):
    with pytest.raises(policy.ScopeError) as info:
        policy.check_request(["teams:read", scope], phi_allowed=True)
    assert (info.value.code, info.value.scopes) == ("scope_not_offered", [scope])
    assert info.value.as_app_error().status_code == 422
    assert policy.check_request(["teams:read", scope], phi_allowed=True, offer_unlisted=True) == [scope, "teams:read"]
    with pytest.raises(policy.ScopeError) as phi:  # offered, and still PHI
        policy.check_request(["teams:read", scope], phi_allowed=False, offer_unlisted=True)
    assert (phi.value.code, phi.value.scopes) == ("baa_required", [scope])


def test_defaults_keep_only_offered_scopes():
    raw = "teams:read calls:read recordings:write nonsense:read users:read"
    assert policy.offered_defaults(raw, offer_unlisted=False) == ["teams:read", "users:read"]
    assert policy.offered_defaults(raw, offer_unlisted=True) == ["calls:read", "recordings:write", "teams:read", "users:read"]


def test_phi_list_is_the_seed_list():
    assert scopes.PHI_SCOPES == {
        "conversations:read", "conversations:write", "messages:read", "messages:write", "calls:read",
        "recordings:read", "recordings:write", "contacts:read", "contacts:write", "attachments:read",
        "attachments:write",
    }


def test_phi_scopes_refused_without_a_baa_and_allowed_with_one():
    with pytest.raises(policy.ScopeError) as info:
        policy.check_request(["teams:read", "messages:read"], phi_allowed=False)
    assert info.value.code == "baa_required"
    assert info.value.scopes == ["messages:read"]
    assert policy.check_request(["teams:read", "messages:read"], phi_allowed=True) == ["messages:read", "teams:read"]
    assert policy.check_request(["teams:read"], phi_allowed=False) == ["teams:read"]


@pytest.mark.parametrize("bad", [["admin:all"], ["teams:read", "TEAMS:READ"], ["teams:read messages:read\x00"]])
def test_unknown_scopes_are_refused(bad):
    with pytest.raises(policy.ScopeError) as info:
        policy.check_request(bad, phi_allowed=True)
    assert info.value.code == "unknown_scope"


def test_empty_request_is_refused():
    with pytest.raises(policy.ScopeError) as info:
        policy.check_request([], phi_allowed=True)
    assert info.value.code == "no_scope"


def test_parse_accepts_space_and_comma_separated_and_dedupes():
    assert scopes.parse("teams:read, users:read teams:read") == ["teams:read", "users:read"]
    assert scopes.format_scopes(["users:read", "teams:read"]) == "teams:read users:read"


def test_usable_drops_phi_while_unsigned():
    granted = ["teams:read", "messages:read"]
    assert policy.usable(granted, phi_allowed=False) == ["teams:read"]
    assert policy.usable(granted, phi_allowed=True) == ["teams:read", "messages:read"]


def test_grouping_puts_phi_resources_first_with_read_and_write():
    groups = scopes.grouped()
    phi_groups = [g for g in groups if g.phi]
    assert groups[: len(phi_groups)] == phi_groups
    messages = next(g for g in groups if g.resource == "messages")
    assert [s.access for s in messages.scopes] == ["read", "write"]
