"""Every proxy rule against the emulator: tenancy, keys, scopes, BAA, retries, idempotency, audit."""

from __future__ import annotations

import asyncio
import email.utils
import time

import pytest
from sqlalchemy import select

from app.audit.audit_log import Actor
from app.connections import store, transitions
from app.core.models import AuditEntry
from app.identity import api_keys
from app.tenants import baa
from app.tenants.registry import get_tenant
from tests.support.journeys import (
    HIPAA_USER,
    auth,
    connected_tenant,
    make_api_key,
    make_tenant,
    sign_baa,
)

CONVERSATIONS = "/api/v1/tenants/{t}/proxy/conversations?filter=open&limit=5"



@pytest.fixture
async def two_tenants(runtime, browser):
    a = await connected_tenant(runtime, browser, "tenant-a")
    b = await connected_tenant(runtime, browser, "tenant-b")
    return a, b


async def first_conversation_id(client, key: str, slug: str) -> int:
    response = await client.get(f"/api/v1/tenants/{slug}/proxy/conversations?limit=1", headers=auth(key))
    assert response.status_code == 200, response.text
    return response.json()[0]["id"]


async def test_a_key_for_tenant_a_cannot_reach_tenant_b(runtime, two_tenants, client_for, upstream):
    a, b = two_tenants
    key = await make_api_key(runtime, tenants=["tenant-a"])
    assert (await client_for.get(CONVERSATIONS.format(t="tenant-a"), headers=auth(key))).status_code == 200
    before = upstream.controls.counter("api.GET /conversations")
    for ref in ("tenant-b", str(b.id), "TENANT-B", "tenant-b%2F..%2Ftenant-a"):
        response = await client_for.get(CONVERSATIONS.format(t=ref), headers=auth(key))
        assert response.status_code in (400, 404), (ref, response.status_code)
        # a NUL is refused at the edge, before the proxy reads the reference
    assert response.json()["error"]["code"] in ("tenant_not_found", "not_found", "invalid_path", "invalid_character")
    # headers and body fields do not choose the tenant: the URL of tenant A is what counts
    sneaky = await client_for.post(
        "/api/v1/tenants/tenant-a/proxy/contacts",
        headers={**auth(key), "X-Tenant-Id": str(b.id), "X-Tenant": "tenant-b"},
        json={"tenant_id": str(b.id), "tenant": "tenant-b", "number": "+12025550199", "first_name": "Cross"},
    )
    assert sneaky.status_code == 201
    assert upstream.controls.counter("api.GET /conversations") == before
    async with runtime.db.session() as session:
        conn_a = await store.get_connection(session, a.id)
    grants = upstream.controls.grants()
    assert conn_a is not None and grants  # the contact was created with tenant A's grant only


@pytest.mark.parametrize("ref", ["tenant%00a", "%00", "tenant-a%0A", "t%C3%A9nant", "x" * 300, "tenant_a", "-tenant-a"])
async def test_a_tenant_reference_that_is_no_slug_is_404_and_never_a_500(runtime, two_tenants, client_for, ref):
    key = await make_api_key(runtime)
    response = await client_for.get(CONVERSATIONS.format(t=ref), headers=auth(key))
    assert response.status_code in (400, 404), (ref, response.status_code, response.text[:200])
    # a NUL is refused at the edge, before the proxy reads the reference
    assert response.json()["error"]["code"] in ("tenant_not_found", "not_found", "invalid_path", "invalid_character")
    # and a bad key is still told so first
    bad = await client_for.get(CONVERSATIONS.format(t=ref), headers=auth(key[:-4] + "AAAA"))
    assert bad.status_code in (400, 401, 404) and bad.status_code != 500


async def test_all_tenant_key_reaches_by_id_and_slug(runtime, two_tenants, client_for):
    a, b = two_tenants
    key = await make_api_key(runtime)
    for ref in ("tenant-a", str(a.id), "tenant-b", str(b.id)):
        assert (await client_for.get(CONVERSATIONS.format(t=ref), headers=auth(key))).status_code == 200


@pytest.mark.parametrize(
    "header",
    [None, "Bearer", "Bearer ", "Basic abc", "Bearer smc_live_short", "Bearer smc_live_AAAAAAAAAAAA_" + "x" * 43, "bearer\tx"],
)
async def test_missing_and_malformed_keys_are_401(runtime, two_tenants, client_for, header, upstream):
    before = upstream.controls.counter("api.GET /conversations")
    headers = {"Authorization": header} if header is not None else {}
    response = await client_for.get(CONVERSATIONS.format(t="tenant-a"), headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] in ("missing_api_key", "invalid_api_key")
    assert response.headers["www-authenticate"] == "Bearer"
    assert upstream.controls.counter("api.GET /conversations") == before


async def test_a_revoked_key_is_refused_on_the_next_request(runtime, two_tenants, client_for):
    key = await make_api_key(runtime, tenants=["tenant-a"])
    assert (await client_for.get(CONVERSATIONS.format(t="tenant-a"), headers=auth(key))).status_code == 200
    async with runtime.db.session() as session:
        row = await api_keys.find_by_prefix(session, api_keys.parse(key))
        await api_keys.revoke_api_key(session, key_id=row.id, actor=Actor.system())
    response = await client_for.get(CONVERSATIONS.format(t="tenant-a"), headers=auth(key))
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("name", ["api_key", "key", "access_token", "token", "API_KEY"])
async def test_a_key_in_the_query_string_is_refused(runtime, two_tenants, client_for, name):
    key = await make_api_key(runtime, tenants=["tenant-a"])
    response = await client_for.get(f"/api/v1/tenants/tenant-a/proxy/conversations?{name}={key}", headers=auth(key))
    assert response.status_code == 400 and response.json()["error"]["code"] == "api_key_in_query"


async def test_read_only_key_cannot_write(runtime, two_tenants, client_for, upstream):
    key = await make_api_key(runtime, tenants=["tenant-a"], read_only=True)
    conversation = await first_conversation_id(client_for, key, "tenant-a")
    response = await client_for.post(f"/api/v1/tenants/tenant-a/proxy/conversations/{conversation}/send",
                                     headers=auth(key), json={"message": "hello"})
    assert response.status_code == 403 and response.json()["error"]["code"] == "read_only_key"
    assert upstream.controls.counter("api.POST /conversations/{id}/send") == 0


async def test_scope_not_granted_is_403_without_calling_salesmsg(runtime, browser, client_for, upstream):
    await connected_tenant(runtime, browser, "narrow", scopes=["teams:read", "users:read"])
    key = await make_api_key(runtime, tenants=["narrow"])
    assert (await client_for.get("/api/v1/tenants/narrow/proxy/teams", headers=auth(key))).status_code == 200
    before = upstream.controls.counters()
    response = await client_for.get(CONVERSATIONS.format(t="narrow"), headers=auth(key))
    assert response.status_code == 403 and response.json()["error"]["code"] == "insufficient_scope"
    assert "conversations:read" in response.json()["error"]["message"]
    after = upstream.controls.counters()
    assert after.get("api.GET /conversations", 0) == before.get("api.GET /conversations", 0)


@pytest.mark.parametrize("path", ["oauth/token", "oauth/token/refresh", "unknown-thing", "calls", "_emulator/counters"])
async def test_unmapped_paths_are_refused(runtime, two_tenants, client_for, path, upstream):
    key = await make_api_key(runtime, tenants=["tenant-a"])
    before = upstream.controls.counters()
    response = await client_for.post(f"/api/v1/tenants/tenant-a/proxy/{path}", headers=auth(key), json={})
    assert (response.status_code, response.json()["error"]["code"]) in ((404, "unknown_endpoint"), (400, "invalid_path"))
    assert upstream.controls.counters() == before


async def test_phi_on_a_hipaa_tenant_needs_the_baa_and_revocation_applies_at_once(runtime, browser, client_for, upstream):
    upstream.controls.set_client_baa("connect-client", True)
    await connected_tenant(runtime, browser, "acme-clinic", hipaa=True, baa=True, user_id=HIPAA_USER)
    key = await make_api_key(runtime, tenants=["acme-clinic"])
    assert (await client_for.get(CONVERSATIONS.format(t="acme-clinic"), headers=auth(key))).status_code == 200
    async with runtime.db.session() as session:
        tenant = await get_tenant(session, "acme-clinic")
        await baa.revoke(session, tenant, reason="test", actor=Actor.system())
    before = upstream.controls.counter("api.GET /conversations")
    denied = await client_for.get(CONVERSATIONS.format(t="acme-clinic"), headers=auth(key))
    assert denied.status_code == 403
    assert denied.json()["error"] == {
        "code": "baa_required",
        "message": "Access denied. You must have a signed Business Associate Agreement (BAA) to continue.",
    }
    assert upstream.controls.counter("api.GET /conversations") == before
    assert (await client_for.get("/api/v1/tenants/acme-clinic/proxy/teams", headers=auth(key))).status_code == 200
    await runtime.audit_writer.flush()
    async with runtime.db.session() as session:
        rows = (await session.scalars(select(AuditEntry).where(AuditEntry.action == "proxy.phi_access").order_by(AuditEntry.id))).all()
    assert [r.outcome for r in rows] == ["success", "denied"]
    assert rows[1].details["decision"] == "baa_required" and rows[1].target == "GET /conversations"
    assert all("filter" not in (r.target or "") and "open" not in str(r.details) for r in rows)
    await sign_baa(runtime, "acme-clinic")
    assert (await client_for.get(CONVERSATIONS.format(t="acme-clinic"), headers=auth(key))).status_code == 200


async def test_needs_reauth_and_not_connected_are_409(runtime, two_tenants, client_for, upstream):
    key = await make_api_key(runtime)
    await make_tenant(runtime, "never-connected", hipaa=False)
    response = await client_for.get(CONVERSATIONS.format(t="never-connected"), headers=auth(key))
    assert response.status_code == 409 and response.json()["error"]["code"] == "not_connected"
    async with runtime.db.session() as session:
        conn = await store.get_connection(session, two_tenants[0].id)
        conn.status = "needs_reauth"
    response = await client_for.get(CONVERSATIONS.format(t="tenant-a"), headers=auth(key))
    assert response.status_code == 409 and response.json()["error"]["code"] == "connection_needs_reauth"
    async with runtime.db.session() as session:
        await transitions.disconnected(session, tenant=await get_tenant(session, "tenant-b"), actor=Actor.system())
    response = await client_for.get(CONVERSATIONS.format(t="tenant-b"), headers=auth(key))
    assert response.status_code == 409 and response.json()["error"]["code"] == "not_connected"


async def test_get_is_retried_on_503_with_retry_after_and_post_is_not(runtime, two_tenants, client_for, upstream):
    key = await make_api_key(runtime, tenants=["tenant-a"])
    conversation = await first_conversation_id(client_for, key, "tenant-a")
    upstream.controls.reset_counters()
    upstream.controls.fail_next(2, status=503, path_prefix="/pub/v2.2/conversations", method="GET", retry_after="0")
    ok = await client_for.get(CONVERSATIONS.format(t="tenant-a"), headers=auth(key))
    assert ok.status_code == 200
    assert upstream.controls.counter("api.GET /conversations") == 3
    upstream.controls.fail_next(1, status=503, path_prefix=f"/pub/v2.2/conversations/{conversation}/send", retry_after="0")
    failed = await client_for.post(f"/api/v1/tenants/tenant-a/proxy/conversations/{conversation}/send",
                                   headers=auth(key), json={"message": "not twice"})
    assert failed.status_code == 503
    assert upstream.controls.counter("api.POST /conversations/{id}/send") == 1


async def test_retry_after_as_http_date_is_honoured(runtime, two_tenants, client_for, upstream):
    key = await make_api_key(runtime, tenants=["tenant-a"])
    when = email.utils.formatdate(time.time() + 2, usegmt=True)  # whole seconds: 1 to 2 s from now
    upstream.controls.fail_next(1, status=503, path_prefix="/pub/v2.2/conversations", method="GET", retry_after=when)
    wait = email.utils.parsedate_to_datetime(when).timestamp() - time.time()
    started = time.monotonic()
    ok = await client_for.get(CONVERSATIONS.format(t="tenant-a"), headers=auth(key))
    assert ok.status_code == 200
    assert upstream.controls.counter("api.GET /conversations") == 2
    assert time.monotonic() - started >= wait - 0.1  # it waited until the date before retrying


async def test_429_goes_back_with_retry_after_when_retries_run_out(runtime, two_tenants, client_for, upstream):
    key = await make_api_key(runtime, tenants=["tenant-a"])
    upstream.controls.fail_next(5, status=429, path_prefix="/pub/v2.2/conversations", method="GET", retry_after="30")
    response = await client_for.get(CONVERSATIONS.format(t="tenant-a"), headers=auth(key))
    assert response.status_code == 429
    assert response.headers["retry-after"] == "30"
    assert upstream.controls.counter("api.GET /conversations") == 1  # 30 s is over the cap: no waiting


async def test_upstream_errors_pass_back_intact_including_html(runtime, two_tenants, client_for, upstream):
    key = await make_api_key(runtime, tenants=["tenant-a"])
    missing = await client_for.get("/api/v1/tenants/tenant-a/proxy/conversations/999999", headers=auth(key))
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("application/json")
    upstream.controls.fail_next(1, status=500, path_prefix="/pub/v2.2/teams", body="<html><body>Server Error</body></html>",
                                content_type="text/html")
    html = await client_for.get("/api/v1/tenants/tenant-a/proxy/teams", headers=auth(key))
    assert html.status_code == 500
    assert html.text == "<html><body>Server Error</body></html>"
    assert html.headers["content-type"].startswith("text/html")


async def test_two_concurrent_sends_with_one_idempotency_key_reach_salesmsg_once(runtime, two_tenants, client_for, upstream):
    key = await make_api_key(runtime, tenants=["tenant-a"])
    conversation = await first_conversation_id(client_for, key, "tenant-a")
    upstream.controls.set_latency(300)
    url = f"/api/v1/tenants/tenant-a/proxy/conversations/{conversation}/send"
    headers = {**auth(key), "Idempotency-Key": "order-4711"}
    first, second = await asyncio.gather(
        client_for.post(url, headers=headers, json={"message": "only once"}),
        client_for.post(url, headers=headers, json={"message": "only once"}),
    )
    upstream.controls.set_latency(0)
    assert {first.status_code, second.status_code} == {201}
    assert first.json()["id"] == second.json()["id"]
    assert upstream.controls.counter("api.POST /conversations/{id}/send") == 1
    replay = await client_for.post(url, headers=headers, json={"message": "only once"})
    assert replay.json()["id"] == first.json()["id"] and replay.headers["idempotent-replayed"] == "true"
    other = await client_for.post(url, headers=headers, json={"message": "a different body"})
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert upstream.controls.counter("api.POST /conversations/{id}/send") == 1
    thread = await client_for.get(f"/api/v1/tenants/tenant-a/proxy/conversations/{conversation}/messages?limit=50", headers=auth(key))
    assert sum(1 for m in thread.json() if m["body"] == "only once") == 1


async def test_idempotency_keys_are_per_tenant(runtime, two_tenants, client_for, upstream):
    key = await make_api_key(runtime)
    for slug in ("tenant-a", "tenant-b"):
        conversation = await first_conversation_id(client_for, key, slug)
        response = await client_for.post(f"/api/v1/tenants/{slug}/proxy/conversations/{conversation}/send",
                                         headers={**auth(key), "Idempotency-Key": "same-key"}, json={"message": "hi"})
        assert response.status_code == 201
    assert upstream.controls.counter("api.POST /conversations/{id}/send") == 2


async def test_oversized_bodies_are_413(runtime, two_tenants, client_for, upstream):
    key = await make_api_key(runtime, tenants=["tenant-a"])
    big = b"x" * (runtime.settings.proxy_max_body_bytes + 1)
    response = await client_for.post("/api/v1/tenants/tenant-a/proxy/contacts", headers=auth(key), content=big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
    assert upstream.controls.counter("api.POST /contacts") == 0


async def test_a_401_on_a_valid_looking_token_forces_one_refresh_and_one_retry(runtime, two_tenants, client_for, upstream):
    key = await make_api_key(runtime, tenants=["tenant-a"])
    upstream.controls.expire_tokens(org_id=3)
    upstream.controls.reset_counters()
    response = await client_for.get(CONVERSATIONS.format(t="tenant-a"), headers=auth(key))
    assert response.status_code == 200
    assert upstream.controls.counter("token.refresh") == 1
    assert upstream.controls.counter("api.GET /conversations") == 2


async def test_timeouts_are_504_and_dropped_connections_502(runtime, two_tenants, client_for, upstream):
    key = await make_api_key(runtime, tenants=["tenant-a"])
    runtime.upstream.timeout = __import__("aiohttp").ClientTimeout(total=0.3)
    upstream.controls.set_latency(1000)
    slow = await client_for.post("/api/v1/tenants/tenant-a/proxy/contacts", headers=auth(key),
                                 json={"number": "+12025550188"})
    upstream.controls.set_latency(0)
    assert slow.status_code == 504 and slow.json()["error"]["code"] == "upstream_timeout"
    upstream.controls.drop_next(5, path_prefix="/pub/v2.2/contacts")
    dropped = await client_for.post("/api/v1/tenants/tenant-a/proxy/contacts", headers=auth(key),
                                    json={"number": "+12025550187"})
    assert dropped.status_code == 502 and dropped.json()["error"]["code"] == "upstream_unavailable"


async def test_phi_calls_are_refused_not_served_unaudited_when_the_audit_queue_is_full(runtime, two_tenants, client_for, upstream):
    key = await make_api_key(runtime, tenants=["tenant-a"])
    before = upstream.controls.counter("api.GET /conversations")
    runtime.audit_writer.max_queue = 0  # as if the database had refused writes for 100,000 records
    try:
        refused = await client_for.get(CONVERSATIONS.format(t="tenant-a"), headers=auth(key))
        teams = await client_for.get("/api/v1/tenants/tenant-a/proxy/teams", headers=auth(key))
    finally:
        runtime.audit_writer.max_queue = 100_000
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "audit_unavailable"
    assert int(refused.headers["retry-after"]) >= 1
    assert upstream.controls.counter("api.GET /conversations") == before  # nothing reached Salesmsg
    assert teams.status_code == 200  # not PHI: served
    assert (await client_for.get(CONVERSATIONS.format(t="tenant-a"), headers=auth(key))).status_code == 200


async def test_rate_limits_answer_429_with_retry_after(runtime, two_tenants, client_for):
    from limits import parse

    from app.proxy.rate_limits import CellRate

    key = await make_api_key(runtime, tenants=["tenant-a"])
    runtime.rate_limits.per_key = CellRate(parse("3/minute"))
    codes = [(await client_for.get("/api/v1/tenants/tenant-a/proxy/teams", headers=auth(key))) for _ in range(4)]
    assert [r.status_code for r in codes[:3]] == [200, 200, 200]
    assert codes[3].status_code == 429 and int(codes[3].headers["retry-after"]) >= 1
    other = await make_api_key(runtime, tenants=["tenant-a"], name="other")
    assert (await client_for.get("/api/v1/tenants/tenant-a/proxy/teams", headers=auth(other))).status_code == 200


async def test_metrics_count_proxy_requests_and_denials(runtime, two_tenants, client_for):
    key = await make_api_key(runtime, tenants=["tenant-a"])
    await client_for.get(CONVERSATIONS.format(t="tenant-a"), headers=auth(key))
    await client_for.get(CONVERSATIONS.format(t="tenant-b"), headers=auth(key))
    text = (await client_for.get("/metrics")).text
    assert 'smc_http_requests_total{method="GET",route="/api/v1/tenants/{tenant}/proxy/{path}",status="200"}' in text
    assert 'smc_proxy_denials_total{reason="tenant_not_found"}' in text
    assert "smc_upstream_seconds_bucket" in text
