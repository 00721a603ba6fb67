"""Salesmsg endpoints the proxy learned: forwarded with the right scope, reads that are POSTs."""

from __future__ import annotations

import pytest

from tests.support.journeys import auth, connected_tenant, make_api_key

PROXY = "/api/v1/tenants/corner-bakery/proxy/"


@pytest.fixture
async def bakery(runtime, browser):
    return await connected_tenant(runtime, browser, "corner-bakery")


async def test_get_user_is_forwarded(runtime, bakery, client_for, upstream):
    key = await make_api_key(runtime, tenants=["corner-bakery"], read_only=True)
    response = await client_for.get(PROXY + "user", headers=auth(key))
    assert response.status_code == 200, response.text
    assert response.json()["email"] == "casey@corner-bakery.example"
    assert upstream.controls.counter("api.GET /user") == 1


async def test_contacts_list_is_a_read_even_for_a_read_only_key(runtime, bakery, client_for, upstream):
    key = await make_api_key(runtime, tenants=["corner-bakery"], read_only=True)
    listed = await client_for.post(PROXY + "contacts/list", headers=auth(key), json={"page": 1, "length": 5})
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert len(body["data"]) == 5 and body["meta"]["per_page"] == 5
    refused = await client_for.post(PROXY + "contacts", headers=auth(key), json={"number": "+12025550177"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "read_only_key"
    assert upstream.controls.counter("api.POST /contacts") == 0


async def test_contacts_list_needs_contacts_read_at_our_gate(runtime, browser, client_for, upstream):
    await connected_tenant(runtime, browser, "corner-bakery", scopes=["teams:read", "users:read"])
    key = await make_api_key(runtime, tenants=["corner-bakery"])
    refused = await client_for.post(PROXY + "contacts/list", headers=auth(key), json={})
    assert refused.status_code == 403 and refused.json()["error"] == {
        "code": "insufficient_scope", "message": "The connection was not granted contacts:read.",
    }
    assert upstream.controls.counter("api.POST /contacts/list") == 0
