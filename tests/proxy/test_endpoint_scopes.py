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
