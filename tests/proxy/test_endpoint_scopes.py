"""Which scope a Salesmsg path needs (pure): reads need ``:read``, the rest ``:write``, unknown paths none."""

from __future__ import annotations

import pytest

from app.connections import scopes
from app.proxy.endpoint_scopes import resolve


@pytest.mark.parametrize(
    ("method", "path", "scope", "template"),
    [
        ("GET", "conversations", "conversations:read", "/conversations"),
        ("GET", "conversations/5001", "conversations:read", "/conversations/{id}"),
        ("HEAD", "conversations/5001", "conversations:read", "/conversations/{id}"),
        ("PUT", "conversations/5001", "conversations:write", "/conversations/{id}"),
        # the longest prefix wins: messages of a conversation are the messages family
        ("GET", "conversations/5001/messages", "messages:read", "/conversations/{id}/messages"),
        ("POST", "conversations/5001/send", "messages:write", "/conversations/{id}/send"),
        ("POST", "contacts/import", "contact-imports:write", "/contacts/import"),
        ("GET", "contacts/77", "contacts:read", "/contacts/{id}"),
        ("DELETE", "contacts/77", "contacts:write", "/contacts/{id}"),
        ("GET", "inboxes", "teams:read", "/inboxes"),
        ("GET", "users/me", "users:read", "/users/me"),
        ("GET", "organization/current", "organizations:read", "/organization/current"),
        ("GET", "organizations/invitations", "organizations-invitations:read", "/organizations/invitations"),
        ("GET", "calls/history", "call-history:read", "/calls/history"),
        ("GET", "recordings/9a8b7c6d5e4f3a2b1c0d", "recordings:read", "/recordings/{id}"),
        ("PATCH", "broadcasts/recurring/12", "broadcasts-recurring:write", "/broadcasts/recurring/{id}"),
        # the current contact listing is a POST that only reads (an explicit override of the method rule)
        ("POST", "contacts/list", "contacts:read", "/contacts/list"),
        ("GET", "contacts", "contacts:read", "/contacts"),  # deprecated at Salesmsg, still served
        ("GET", "contacts/search", "contacts:read", "/contacts/search"),
        ("PUT", "contacts/opt-out/77", "contacts:write", "/contacts/opt-out/{id}"),
        ("PUT", "contacts/opt-in/77", "contacts:write", "/contacts/opt-in/{id}"),
        # tagging a contact changes the contact (PHI): contacts:write, not tags:write
        ("PUT", "tags/contact/77/51", "contacts:write", "/tags/contact/{id}/{id}"),
        ("DELETE", "tags/contact/77/51", "contacts:write", "/tags/contact/{id}/{id}"),
        ("GET", "tags", "tags:read", "/tags"),
        ("POST", "tags", "tags:write", "/tags"),
        ("GET", "user", "users:read", "/user"),
        ("GET", "organization/members", "organizations:read", "/organization/members"),
        ("POST", "conversations", "conversations:write", "/conversations"),
    ],
)
def test_known_endpoints_need_their_family_scope(method, path, scope, template):
    endpoint = resolve(method, path)
    assert endpoint is not None
    assert (endpoint.scope, endpoint.template) == (scope, template)
    assert endpoint.scope in scopes.ALL_SCOPES


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "admin"),
        ("GET", "oauth/token"),
        ("POST", "calls"),  # Salesmsg publishes calls read-only
        ("GET", "conversationsx"),
        ("GET", ""),
    ],
)
def test_unknown_endpoints_are_refused(method, path):
    assert resolve(method, path) is None


def test_ids_never_reach_the_template():
    endpoint = resolve("GET", "contacts/123456/notes/0f8fad5b-d9cb-469f-a165-70867728950e")
    assert endpoint is not None and endpoint.template == "/contacts/{id}/notes/{id}"


def test_explicit_overrides_match_their_method_and_exact_path_only():
    assert resolve("POST", "contacts/list").reads
    for method, path in [("PUT", "contacts/list"), ("POST", "contacts/list/9"), ("DELETE", "contacts/list")]:
        endpoint = resolve(method, path)
        assert endpoint is not None and endpoint.scope == "contacts:write" and not endpoint.reads, (method, path)
    assert resolve("GET", "users/me").reads and not resolve("POST", "contacts").reads


def test_every_known_endpoint_needs_a_scope_of_the_catalogue():
    from app.proxy import endpoint_scopes

    for (method, path), scope in endpoint_scopes._EXPLICIT.items():
        assert scope in scopes.ALL_SCOPES and resolve(method, path.replace("*", "1")).scope == scope
    for prefix, family in endpoint_scopes._FAMILIES:
        assert f"{family}:read" in scopes.ALL_SCOPES, prefix
