"""The proxy against the emulator: forwarding, scopes, tenancy, BAA, safety."""

from __future__ import annotations

import pytest

from tests.support.journeys import connected_tenant, make_api_key


@pytest.fixture
async def bakery(runtime, browser):
    return await connected_tenant(runtime, browser, "corner-bakery")


async def test_get_conversations_through_the_proxy(runtime, bakery, client_for):
    key = await make_api_key(runtime, tenants=["corner-bakery"])
    response = await client_for.get("/api/v1/tenants/corner-bakery/proxy/conversations?filter=open&limit=5",
                                    headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body, list) and 0 < len(body) <= 5
    assert "authorization" not in {k.lower() for k in response.headers}
