"""The management API: tenants, HIPAA/BAA (operator keys), connections, links, events, audit export."""

from __future__ import annotations

import json

import pytest

from tests.support.journeys import auth, connected_tenant, make_api_key, make_tenant


@pytest.fixture
async def operator_key(runtime) -> str:
    return await make_api_key(runtime, operator=True, name="ops")


async def test_operator_creates_lists_and_pages_tenants(client_for, operator_key):
    for i in range(5):
        created = await client_for.post("/api/v1/tenants", headers=auth(operator_key),
                                        json={"slug": f"org-{i}", "name": f"Org {i}"})
        assert created.status_code == 201, created.text
        assert created.json()["hipaa"] is True and created.json()["baa"]["signed"] is False
    seen, cursor = [], None
    while True:
        page = await client_for.get("/api/v1/tenants", headers=auth(operator_key),
                                    params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200
        seen += [t["slug"] for t in page.json()["data"]]
        cursor = page.json()["next_cursor"]
        if not cursor:
            break
    assert seen == [f"org-{i}" for i in range(5)]
    dup = await client_for.post("/api/v1/tenants", headers=auth(operator_key), json={"slug": "org-1", "name": "Again"})
    assert dup.status_code == 409 and dup.json()["error"]["code"] == "tenant_exists"


async def test_tenant_scoped_keys_see_only_their_tenants(runtime, client_for):
    a = await make_tenant(runtime, "alpha")
    b = await make_tenant(runtime, "beta")
    key = await make_api_key(runtime, tenants=["alpha"])
    listed = await client_for.get("/api/v1/tenants", headers=auth(key))
    assert [t["slug"] for t in listed.json()["data"]] == ["alpha"]
    for ref in ("beta", str(b.id)):
        assert (await client_for.get(f"/api/v1/tenants/{ref}", headers=auth(key))).status_code == 404
    assert (await client_for.get(f"/api/v1/tenants/{a.id}", headers=auth(key))).status_code == 200
    assert (await client_for.post("/api/v1/tenants", headers=auth(key), json={"slug": "gamma", "name": "G"})).status_code == 403


@pytest.mark.parametrize(
    "field",
    [{"hipaa": False}, {"baa_signed_at": "2026-01-01T00:00:00Z"}, {"baa": {"signed": True}}, {"id": "x"}, {"role": "operator"},
     {"tenant_id": "x"}, {"slug": "renamed"}],
)
async def test_protected_fields_cannot_be_mass_assigned(runtime, client_for, operator_key, field):
    await make_tenant(runtime, "guarded")
    response = await client_for.patch("/api/v1/tenants/guarded", headers=auth(operator_key), json={"name": "New", **field})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"
    tenant = (await client_for.get("/api/v1/tenants/guarded", headers=auth(operator_key))).json()
    assert tenant["name"] == "Guarded" and tenant["hipaa"] is True and tenant["baa"]["signed"] is False


async def test_hipaa_and_baa_need_an_operator_key_and_are_audited(runtime, client_for, operator_key):
    await make_tenant(runtime, "clinic")
    service = await make_api_key(runtime, tenants=["clinic"])
    for method, path, body in [("PUT", "hipaa", {"hipaa": False}), ("POST", "baa", {"reference": "B-1"}), ("POST", "baa/revoke", {})]:
        denied = await client_for.request(method, f"/api/v1/tenants/clinic/{path}", headers=auth(service), json=body)
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "operator_key_required"
    signed = await client_for.post("/api/v1/tenants/clinic/baa", headers=auth(operator_key), json={"reference": "B-1"})
    assert signed.status_code == 200 and signed.json()["baa"]["signed"] is True
    again = await client_for.post("/api/v1/tenants/clinic/baa", headers=auth(operator_key), json={"reference": "B-2"})
    assert again.status_code == 409
    revoked = await client_for.post("/api/v1/tenants/clinic/baa/revoke", headers=auth(operator_key), json={"reason": "x"})
    assert revoked.json()["baa"]["signed"] is False
    export = await client_for.get("/api/v1/audit", headers=auth(operator_key), params={"tenant": "clinic"})
    assert export.status_code == 200 and export.headers["content-type"].startswith("application/x-ndjson")
    actions = [json.loads(line)["action"] for line in export.text.splitlines()]
    assert actions == ["tenant.create", "api_key.create", "baa.sign", "baa.revoke"]
    assert (await client_for.get("/api/v1/audit", headers=auth(service))).status_code == 403


async def test_audit_export_filters_by_time_and_refuses_naive_times(runtime, client_for, operator_key):
    await make_tenant(runtime, "timed")
    everything = await client_for.get("/api/v1/audit", headers=auth(operator_key))
    assert len(everything.text.splitlines()) >= 1
    future = await client_for.get("/api/v1/audit", headers=auth(operator_key), params={"since": "2999-01-01T00:00:00Z"})
    assert future.text == ""
    naive = await client_for.get("/api/v1/audit", headers=auth(operator_key), params={"since": "2026-01-01T00:00:00"})
    assert naive.status_code == 422 and naive.json()["error"]["code"] == "invalid_time"


async def test_connection_status_refresh_links_events_and_disconnect(runtime, browser, client_for, upstream):
    await connected_tenant(runtime, browser, "live")
    key = await make_api_key(runtime, tenants=["live"])
    status = await client_for.get("/api/v1/tenants/live/connection", headers=auth(key))
    assert status.status_code == 200
    body = status.json()
    assert body["status"] == "active" and body["needs_reauth"] is False and "conversations:read" in body["scopes"]
    refreshed = await client_for.post("/api/v1/tenants/live/connection/refresh", headers=auth(key))
    assert refreshed.status_code == 200 and refreshed.json()["last_refresh_at"] is not None
    assert upstream.controls.counter("token.refresh") == 1
    link = await client_for.post("/api/v1/tenants/live/connect-links", headers=auth(key))
    assert link.status_code == 201 and "/connect/smc_link_" in link.json()["url"]
    events = await client_for.get("/api/v1/tenants/live/events", headers=auth(key), params={"limit": 1})
    assert events.json()["data"][0]["type"] == "refreshed" and events.json()["next_cursor"]
    older = await client_for.get("/api/v1/tenants/live/events", headers=auth(key), params={"cursor": events.json()["next_cursor"]})
    assert [e["type"] for e in older.json()["data"]] == ["connected"]
    gone = await client_for.delete("/api/v1/tenants/live/connection", headers=auth(key))
    assert gone.status_code == 200 and gone.json()["status"] == "disconnected"
    assert (await client_for.post("/api/v1/tenants/live/connection/refresh", headers=auth(key))).status_code == 409


async def test_read_only_keys_cannot_change_anything(runtime, client_for):
    await make_tenant(runtime, "ro")
    key = await make_api_key(runtime, tenants=["ro"], read_only=True)
    assert (await client_for.get("/api/v1/tenants/ro", headers=auth(key))).status_code == 200
    response = await client_for.patch("/api/v1/tenants/ro", headers=auth(key), json={"name": "Changed"})
    assert response.status_code == 403 and response.json()["error"]["code"] == "read_only_key"
    assert (await client_for.post("/api/v1/tenants/ro/connect-links", headers=auth(key))).status_code == 403


async def test_webhook_url_set_returns_the_secret_once(runtime, client_for, operator_key):
    await make_tenant(runtime, "hooked")
    response = await client_for.patch("/api/v1/tenants/hooked", headers=auth(operator_key),
                                      json={"webhook_url": "https://hooks.example.com/x"})
    assert response.status_code == 200 and response.json()["webhook_secret"].startswith("whsec_")
    again = await client_for.get("/api/v1/tenants/hooked", headers=auth(operator_key))
    assert "webhook_secret" not in again.json() and again.json()["webhook_url"] == "https://hooks.example.com/x"
    bad = await client_for.patch("/api/v1/tenants/hooked", headers=auth(operator_key), json={"webhook_url": "ftp://x"})
    assert bad.status_code == 422


async def test_api_errors_are_stable_json(client_for, operator_key):
    cases = [
        ("GET", "/api/v1/tenants?limit=0", 422, "invalid_request"),
        ("GET", "/api/v1/tenants?cursor=!!!", 422, "invalid_cursor"),
        ("GET", "/api/v1/tenants/nope", 404, "tenant_not_found"),
        ("POST", "/api/v1/tenants", 422, "invalid_request"),
        ("DELETE", "/api/v1/tenants", 405, "method_not_allowed"),
    ]
    for method, path, status, code in cases:
        response = await client_for.request(method, path, headers=auth(operator_key))
        assert response.status_code == status, (path, response.text)
        assert response.json()["error"]["code"] == code
    broken = await client_for.post("/api/v1/tenants", headers={**auth(operator_key), "Content-Type": "application/json"},
                                   content=b'{"slug": "x"')
    assert broken.status_code == 422
    assert (await client_for.get("/api/v1/tenants?api_key=abc", headers=auth(operator_key))).status_code == 400


async def test_deleting_a_tenant_shreds_its_keys_and_cuts_the_proxy(runtime, browser, client_for, upstream):
    await connected_tenant(runtime, browser, "doomed")
    service = await make_api_key(runtime)
    operator = await make_api_key(runtime, operator=True, name="ops")
    assert (await client_for.get("/api/v1/tenants/doomed/proxy/teams", headers=auth(service))).status_code == 200
    assert (await client_for.delete("/api/v1/tenants/doomed", headers=auth(service))).status_code == 403
    assert (await client_for.delete("/api/v1/tenants/doomed", headers=auth(operator))).status_code == 204
    assert (await client_for.get("/api/v1/tenants/doomed/proxy/teams", headers=auth(service))).status_code == 404
    from sqlalchemy import func, select

    from app.core.models import Connection, TenantKey

    async with runtime.db.session() as session:
        assert await session.scalar(select(func.count()).select_from(TenantKey)) == 0
        assert await session.scalar(select(func.count()).select_from(Connection)) == 0
    export = await client_for.get("/api/v1/audit", headers=auth(operator))
    assert '"action":"tenant.delete"' in export.text
