"""Attacks across every entry point: each is refused with a clear 4xx, no 5xx, and nothing written."""

from __future__ import annotations

import io
import json
import re
import uuid

import pytest
from sqlalchemy import func, select
from starlette.routing import Route

from app.core.models import Base, User
from app.web import ROUTERS as WEB_ROUTERS
from tests.support.journeys import (
    PASSWORD,
    Browser,
    connected_tenant,
    csrf_of,
    make_api_key,
    make_tenant,
    make_user,
)


async def table_counts(runtime) -> dict[str, int]:
    async with runtime.db.session() as session:
        return {t.name: await session.scalar(select(func.count()).select_from(t)) for t in Base.metadata.sorted_tables}


def state_changing_form_routes() -> list[str]:
    paths = []
    for router in WEB_ROUTERS:
        for route in router.routes:
            if isinstance(route, Route) and "POST" in (route.methods or ()):
                paths.append(route.path)
    return sorted(set(paths))


def fill(path: str) -> str:
    return (path.replace("{slug}", "victim").replace("{token}", "smc_inv_" + "x" * 43)
            .replace("{key_id}", str(uuid.uuid4())).replace("{conversation_id}", "5001"))


@pytest.fixture
async def operator(runtime, browser):
    await make_user(runtime, "op@example.com")
    await browser.login("op@example.com")
    return browser


async def test_csrf_is_required_on_every_state_changing_form(runtime, operator, live_app, upstream):
    await connected_tenant(runtime, operator, "victim")
    routes = state_changing_form_routes()
    assert len(routes) >= 15, routes
    other = Browser(live_app, upstream.url)
    await make_user(runtime, "other@example.com")
    await other.login("other@example.com")
    foreign_token = csrf_of((await other.get("/tenants")).text)
    await other.close()
    before = await table_counts(runtime)
    for path in routes:
        url = fill(path)
        for label, data, headers in [
            ("missing", {}, {}),
            ("forged", {"csrf_token": "forged"}, {}),
            ("another session's", {"csrf_token": foreign_token}, {}),
            ("cross-origin", {"csrf_token": csrf_of((await operator.get("/tenants")).text)}, {"Origin": "https://evil.example"}),
        ]:
            response = await operator.app_client.post(url, data={**data, "name": "x", "email": "a@b.cd", "reference": "r",
                                                                  "confirm": "yes", "message": "hi", "scope": "teams:read"},
                                                      headers=headers)
            assert response.status_code == 403, (label, path, response.status_code)
            assert "csrf_failed" in response.text
    after = await table_counts(runtime)
    assert after == before


@pytest.mark.parametrize(
    "target",
    ["https://evil.example/", "//evil.example", "/\\evil.example", "\\\\evil.example", "javascript:alert(1)",
     "http:/evil.example", "/%2F%2Fevil.example", " //evil.example", "/\t/evil.example", "https:evil.example"],
)
async def test_no_open_redirect_after_sign_in(runtime, browser, target):
    await make_user(runtime, "op@example.com")
    page = await browser.get("/login", params={"next": target})
    answer = await browser.app_client.post("/login", data={"csrf_token": csrf_of(page.text), "email": "op@example.com",
                                                           "password": PASSWORD, "next": target})
    assert answer.status_code == 303
    location = answer.headers["location"]
    assert location.startswith("/") and not location.startswith("//") and "evil" not in location


async def test_open_redirect_in_the_revoke_form_back_field(runtime, operator):
    await make_tenant(runtime, "victim")
    key = await make_api_key(runtime, tenants=["victim"])
    from app.identity import api_keys

    async with runtime.db.session() as session:
        row = await api_keys.find_by_prefix(session, api_keys.parse(key))
    answer = await operator.post_form(f"/api-keys/{row.id}/revoke", {"back": "https://evil.example/"}, csrf_from="/api-keys")
    assert answer.status_code == 303 and answer.headers["location"] == "/api-keys"


async def test_session_fixation_a_planted_cookie_never_becomes_a_session(runtime, browser):
    await make_user(runtime, "op@example.com")
    planted = "attacker-chosen-session-value-0000000000000"
    browser.app_client.cookies.set("smc_session", planted, domain="127.0.0.1", path="/")
    await browser.login("op@example.com")
    issued = browser.app_client.cookies.get("smc_session")
    assert issued and issued != planted
    attacker = httpx_client(browser, planted)
    assert (await attacker.get("/tenants")).status_code == 303  # to /login: not signed in
    await attacker.aclose()


async def test_sign_in_issues_a_new_session_id_and_logout_kills_it(runtime, browser):
    await make_user(runtime, "op@example.com")
    await browser.login("op@example.com")
    first = browser.app_client.cookies.get("smc_session")
    token = csrf_of((await browser.get("/tenants")).text)  # signed in: /login would redirect
    await browser.app_client.post("/login", data={"csrf_token": token, "email": "op@example.com", "password": PASSWORD})
    second = browser.app_client.cookies.get("smc_session")
    assert first != second
    stale = httpx_client(browser, first)
    assert (await stale.get("/tenants")).status_code == 303
    await stale.aclose()
    await browser.post_form("/logout", {}, csrf_from="/tenants")
    replay = httpx_client(browser, second)
    assert (await replay.get("/tenants")).status_code == 303
    await replay.aclose()


def httpx_client(browser: Browser, session_cookie: str):
    import httpx

    return httpx.AsyncClient(transport=browser.app_client._transport, base_url="http://127.0.0.1:8000",
                             cookies={"smc_session": session_cookie})


async def test_sign_in_is_rate_limited(runtime, browser):
    await make_user(runtime, "op@example.com")
    codes = []
    for i in range(12):
        page = await browser.get("/login")
        answer = await browser.app_client.post("/login", data={"csrf_token": csrf_of(page.text), "email": "op@example.com",
                                                               "password": f"wrong-guess-{i:04d}"})
        codes.append(answer.status_code)
    assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]
    page = await browser.get("/login")
    right = await browser.app_client.post("/login", data={"csrf_token": csrf_of(page.text), "email": "op@example.com",
                                                          "password": PASSWORD})
    assert right.status_code == 429  # even the right password waits out the window


async def test_cross_tenant_actions_from_an_org_admin_are_refused(runtime, live_app, upstream, browser):
    mine = await connected_tenant(runtime, browser, "mine")
    await connected_tenant(runtime, browser, "victim")
    await make_user(runtime, "admin@mine.example", role="org_admin", tenant=mine)
    admin = Browser(live_app, upstream.url)
    await admin.login("admin@mine.example")
    before = await table_counts(runtime)
    token = csrf_of((await admin.get("/t/mine")).text)
    for path in ["/t/victim/disconnect", "/t/victim/connect", "/t/victim/connect/pat", "/t/victim/baa", "/t/victim/baa/revoke",
                 "/t/victim/hipaa", "/t/victim/connect-links", "/t/victim/invitations", "/t/victim/conversations/5001/send",
                 "/t/mine/baa", "/t/mine/hipaa", "/t/mine/connect-links", "/tenants", "/api-keys"]:
        answer = await admin.app_client.post(path, data={"csrf_token": token, "reference": "x", "confirm": "yes", "hipaa": "off",
                                                          "message": "hi", "idempotency_key": "a" * 32, "name": "n",
                                                          "slug": "evil", "scope": "teams:read", "email": "e@x.io"})
        assert answer.status_code in (403, 404), (path, answer.status_code)
    assert await table_counts(runtime) == before
    await admin.close()


async def test_a_connect_link_session_reaches_only_its_consent_screen(runtime, operator, live_app, upstream):
    await make_tenant(runtime, "linked")
    await make_tenant(runtime, "victim")
    shown = await operator.post_form("/t/linked/connect-links", {}, csrf_from="/t/linked")
    link = re.search(r'value="(http://127\.0\.0\.1:8000/connect/smc_link_[^"]+)"', shown.text).group(1)
    visitor = Browser(live_app, upstream.url)
    opened = await visitor.get(link.replace("http://127.0.0.1:8000", ""))
    assert opened.status_code == 303 and opened.headers["location"] == "/t/linked/connect"
    assert (await visitor.get("/t/linked/connect")).status_code == 200
    for path in ("/t/linked", "/t/linked/conversations", "/t/victim/connect", "/tenants", "/audit", "/api-keys"):
        assert (await visitor.get(path)).status_code in (303, 403, 404), path
    # Opening spends nothing (mail scanners open links first): another opener gets a session of its
    # own, held to the same tenant.
    again = Browser(live_app, upstream.url)
    reopened = await again.get(link.replace("http://127.0.0.1:8000", ""))
    assert reopened.status_code == 303 and reopened.headers["location"] == "/t/linked/connect"
    assert (await again.get("/t/victim/connect")).status_code == 404
    await visitor.close()
    await again.close()


async def test_mass_assignment_through_the_invitation_form(runtime, operator, live_app, upstream):
    tenant = await make_tenant(runtime, "invited")
    await make_tenant(runtime, "victim")
    shown = await operator.post_form("/t/invited/invitations", {"email": "new@invited.example"}, csrf_from="/t/invited")
    link = re.search(r'value="http://127\.0\.0\.1:8000(/invite/smc_inv_[^"]+)"', shown.text).group(1)
    newcomer = Browser(live_app, upstream.url)
    page = await newcomer.get(link)
    answer = await newcomer.app_client.post(link, data={
        "csrf_token": csrf_of(page.text), "name": "New", "password": "long enough password", "confirm": "long enough password",
        "role": "operator", "tenant_id": str(uuid.uuid4()), "tenant": "victim", "email": "evil@evil.example",
    })
    assert answer.status_code == 303
    async with runtime.db.session() as session:
        user = await session.scalar(select(User).where(User.email == "new@invited.example"))
    assert user.role == "org_admin" and user.tenant_id == tenant.id
    assert (await newcomer.get("/tenants")).status_code == 403
    await newcomer.close()


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"[" * 200_000, "application/json"),
        (b'{"slug": "a", "name": ' + b"[" * 50_000 + b"}", "application/json"),
        (b'{"slug": "\xff\xfe", "name": "x"}', "application/json"),
        (b"\xff\xfe\x00\x01", "application/json"),
        (b'{"slug": "ok-slug", "name": "x"', "application/json"),
        (b"slug=a&name=b", "application/x-www-form-urlencoded"),
        (b"<xml/>", "application/xml"),
    ],
)
async def test_malformed_nested_and_non_utf8_bodies_are_4xx(runtime, client_for, body, content_type):
    key = await make_api_key(runtime, operator=True, name="ops")
    before = await table_counts(runtime)
    answer = await client_for.post("/api/v1/tenants", content=body, headers={"Content-Type": content_type, "Authorization": f"Bearer {key}"})
    assert 400 <= answer.status_code < 500, answer.status_code
    assert answer.json()["error"]["code"]
    assert await table_counts(runtime) == before


async def test_oversized_bodies_are_413_everywhere(runtime, client_for, browser):
    key = await make_api_key(runtime, operator=True, name="ops")
    huge = b"x" * (1024 * 1024 + 1)
    api = await client_for.post("/api/v1/tenants", content=huge, headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    assert api.status_code == 413 and api.json()["error"]["code"] == "payload_too_large"
    page = await browser.app_client.post("/login", content=huge, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert page.status_code == 413

    async def chunks():
        for _ in range(40):
            yield b"y" * 65536

    chunked = await client_for.post("/api/v1/tenants", content=chunks(), headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    assert chunked.status_code == 413


@pytest.mark.parametrize("term", ["%", "_", "' OR 1=1 --", "\\", "%' UNION SELECT key_hash FROM api_keys --", "acme%25"])
async def test_search_and_filter_parameters_are_literal(runtime, client_for, operator, term):
    await make_tenant(runtime, "acme")
    key = await make_api_key(runtime, operator=True, name="ops")
    api = await client_for.get("/api/v1/tenants", params={"search": term}, headers={"Authorization": f"Bearer {key}"})
    assert api.status_code == 200 and api.json()["data"] == []
    page = await operator.get("/tenants", params={"q": term})
    assert page.status_code == 200 and "/t/acme" not in page.text
    for params in ({"status": term}, {"limit": term}, {"cursor": term}):
        assert 400 <= (await client_for.get("/api/v1/tenants", params=params, headers={"Authorization": f"Bearer {key}"})).status_code < 500
    audit_page = await operator.get("/audit", params={"action": term})
    assert audit_page.status_code in (200, 422)  # only [a-z_.] is accepted, and "_" is matched literally
    assert (await operator.get("/t/acme/conversations", params={"filter": term})).status_code == 422


async def test_upstream_data_and_names_render_as_text(runtime, browser, client_for, upstream):
    await connected_tenant(runtime, browser, "xss-org")
    key = await make_api_key(runtime, tenants=["xss-org"])
    payload = '<img src=x onerror="alert(1)">'
    created = await client_for.post("/api/v1/tenants/xss-org/proxy/contacts", headers={"Authorization": f"Bearer {key}"},
                                    json={"number": "+12025550177", "first_name": payload, "last_name": "<b>x</b>"})
    assert created.status_code == 201
    page = await browser.get("/t/xss-org/contacts", params={"search": "2025550177"})
    assert payload not in page.text and "&lt;img src=x" in page.text
    await browser.post_form("/tenants", {"slug": "xss-tenant", "name": "<script>alert('t')</script>"})
    listing = await browser.get("/tenants")
    assert "<script>alert('t')</script>" not in listing.text and "&lt;script&gt;" in listing.text


async def test_header_injection_and_host_spoofing(runtime, operator, client_for):
    await make_tenant(runtime, "hosty")
    shown = await operator.app_client.post("/t/hosty/connect-links", data={"csrf_token": csrf_of((await operator.get("/t/hosty")).text)},
                                           headers={"Host": "evil.example", "X-Forwarded-Host": "evil.example"})
    assert shown.status_code in (200, 403)
    if shown.status_code == 200:
        assert "evil.example" not in shown.text
    key = await make_api_key(runtime, tenants=["hosty"])
    odd = await client_for.post("/api/v1/tenants/hosty/proxy/contacts", headers={"Authorization": f"Bearer {key}",
                                                                                 "Idempotency-Key": "bad key with spaces"}, json={})
    assert odd.status_code in (400, 409)
    forged_id = await client_for.get("/healthz", headers={"X-Request-ID": "x" * 500})
    assert forged_id.headers["x-request-id"] != "x" * 500


async def test_log_injection_is_neutralised(runtime, browser):
    from app.core.logs import configure_logging

    stream = io.StringIO()
    configure_logging(level="INFO", json_output=True, stream=stream)
    try:
        await browser.get("/no-such%0d%0aFAKE%20level=error%20event=forged")
        page = await browser.get("/login")
        await browser.app_client.post("/login", data={"csrf_token": csrf_of(page.text), "email": "x@y.zz\nFAKE RECORD",
                                                      "password": "nope-nope-nope"})
    finally:
        configure_logging(level="INFO", json_output=False)
    for line in stream.getvalue().splitlines():
        record = json.loads(line)  # every line is one whole record
        assert record.get("event") != "forged"


async def test_api_keys_on_the_management_api(runtime, client_for):
    await make_tenant(runtime, "keys")
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic Zm9vOmJhcg=="},
                    {"Authorization": "Bearer smc_live_AAAAAAAAAAAA_" + "a" * 43}):
        answer = await client_for.get("/api/v1/tenants", headers=headers)
        assert answer.status_code == 401 and answer.json()["error"]["code"] in ("missing_api_key", "invalid_api_key")
    key = await make_api_key(runtime, operator=True, name="ops")
    assert (await client_for.get(f"/api/v1/tenants?api_key={key}", headers={"Authorization": f"Bearer {key}"})).status_code == 400
    from app.audit.audit_log import Actor
    from app.identity import api_keys

    async with runtime.db.session() as session:
        row = await api_keys.find_by_prefix(session, api_keys.parse(key))
        await api_keys.revoke_api_key(session, key_id=row.id, actor=Actor.system())
    assert (await client_for.get("/api/v1/tenants", headers={"Authorization": f"Bearer {key}"})).status_code == 401

