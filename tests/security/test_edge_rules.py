"""The rules at the edge: text PostgreSQL cannot hold, duplicate JSON keys, the Host header.

Every route of /openapi.json and every browser form is walked with a NUL in each place a value
can go; each must be refused with a stable 4xx before any query, and nothing written.
"""

from __future__ import annotations

import json
import re

import pytest
from fastapi.routing import APIRoute
from sqlalchemy import select

from app.core.models import AuditEntry
from app.web import ROUTERS as WEB_ROUTERS
from tests.security.test_attacks import fill, table_counts
from tests.support.journeys import auth, connected_tenant, csrf_of, make_api_key, make_tenant, make_user

NUL = "a\x00b"
LONE_SURROGATE = "\ud800"


def _operations(spec: dict) -> list[tuple[str, str, dict]]:
    return [(method.upper(), path, op) for path, item in spec["paths"].items() for method, op in item.items()
            if method in ("get", "post", "put", "patch", "delete")]


def _json_fields(spec: dict, op: dict) -> list[str]:
    content = op.get("requestBody", {}).get("content", {}).get("application/json")
    if not content:
        return []
    ref = content["schema"].get("$ref", "")
    schema = spec["components"]["schemas"][ref.rsplit("/", 1)[-1]] if ref else content["schema"]
    return list(schema.get("properties", {}))


def _expect_refused(answer, *, status: int, code: str) -> None:
    assert answer.status_code == status, (answer.status_code, answer.text[:300])
    assert answer.json()["error"]["code"] == code


@pytest.fixture
async def operator_key(runtime):
    await make_tenant(runtime, "victim", hipaa=True)
    return await make_api_key(runtime, operator=True, name="ops")


async def test_a_nul_anywhere_in_the_management_api_is_refused_before_any_query(runtime, client_for, operator_key):
    spec = (await client_for.get("/openapi.json")).json()
    before = await table_counts(runtime)
    tried = 0
    for method, template, op in _operations(spec):
        params = op.get("parameters", [])
        path = re.sub(r"\{[^}]+\}", "victim", template).replace("/victim/events/victim", "/victim/events/1")
        body_fields = _json_fields(spec, op)
        body = {field: "x" for field in body_fields} if body_fields else None
        # every path parameter
        for param in (p for p in params if p["in"] == "path"):
            bad_path = template
            for other in (p for p in params if p["in"] == "path"):
                value = "a%00b" if other is param else ("1" if other["name"] == "event_id" else "victim")
                bad_path = bad_path.replace("{" + other["name"] + "}", value)
            answer = await client_for.request(method, bad_path, headers=auth(operator_key), json=body)
            _expect_refused(answer, status=400, code="invalid_character")
            tried += 1
        # every query parameter
        for param in (p for p in params if p["in"] == "query"):
            answer = await client_for.request(method, path, params={param["name"]: NUL}, headers=auth(operator_key), json=body)
            _expect_refused(answer, status=400, code="invalid_character")
            tried += 1
        # every string field of a JSON body
        for field in body_fields:
            answer = await client_for.request(method, path, headers=auth(operator_key), json={**(body or {}), field: NUL})
            _expect_refused(answer, status=422, code="invalid_character")
            tried += 1
    assert tried >= 20
    assert await table_counts(runtime) == before


async def test_a_lone_surrogate_in_json_is_refused(runtime, client_for, operator_key):
    raw = json.dumps({"reference": "BAA " + LONE_SURROGATE}).encode()  # json.dumps escapes it as \ud800
    answer = await client_for.post("/api/v1/tenants/victim/baa", content=raw,
                                   headers={**auth(operator_key), "Content-Type": "application/json"})
    _expect_refused(answer, status=422, code="invalid_character")


def _form_routes() -> list[tuple[str, list[str]]]:
    found = []
    for router in WEB_ROUTERS:
        for route in router.routes:
            if isinstance(route, APIRoute) and "POST" in route.methods:
                fields = [f.alias for f in route.dependant.body_params]
                found.append((route.path, fields or ["scope"]))
    return found


async def test_a_nul_in_any_form_field_is_refused(runtime, live_app, browser, upstream):
    await make_user(runtime, "op@example.com")
    await browser.login("op@example.com")
    await make_tenant(runtime, "victim", hipaa=True)
    before = await table_counts(runtime)
    routes = _form_routes()
    assert len(routes) >= 15
    for path, fields in routes:
        for field in fields:
            answer = await browser.app_client.post(fill(path), data={"csrf_token": "whatever", field: NUL})
            assert answer.status_code == 422, (path, field, answer.status_code)
            assert "invalid_character" in answer.text or "cannot store" in answer.text
    assert await table_counts(runtime) == before


async def test_multipart_bodies_are_refused_since_no_form_of_ours_sends_one(runtime, client_for, browser, operator_key):
    """A multipart field can spell a NUL through its charset (UTF-7 ``+AAA-``), which no byte scan sees."""
    page = await browser.app_client.get("/login")
    csrf = csrf_of(page.text)
    files = {"csrf_token": (None, csrf), "email": (None, "a+AAA-b@example.com"), "password": (None, "x" * 12)}
    answer = await browser.app_client.post("/login", files=files)
    assert answer.status_code == 415
    api = await client_for.post("/api/v1/tenants", files={"slug": (None, "multi"), "name": (None, "Multi")}, headers=auth(operator_key))
    _expect_refused(api, status=415, code="unsupported_media_type")


async def test_a_nul_in_a_page_url_is_refused(browser):
    for url in ("/t/a%00b", "/t/victim/conversations?q=a%00b", "/tenants?q=%00"):
        answer = await browser.app_client.get(url)
        assert answer.status_code == 400, (url, answer.status_code)


async def test_duplicate_json_keys_are_refused_not_read_the_weaker_way(runtime, client_for, operator_key):
    before = await table_counts(runtime)
    raw = b'{"slug": "sneaky", "name": "Sneaky", "hipaa": true, "hipaa": false}'
    answer = await client_for.post("/api/v1/tenants", content=raw, headers={**auth(operator_key), "Content-Type": "application/json"})
    _expect_refused(answer, status=422, code="duplicate_key")
    nested = b'{"name": "x", "webhook_url": "https://a.example", "webhook_url": "https://b.example"}'
    answer = await client_for.patch("/api/v1/tenants/victim", content=nested,
                                    headers={**auth(operator_key), "Content-Type": "application/json"})
    _expect_refused(answer, status=422, code="duplicate_key")
    assert await table_counts(runtime) == before


async def test_the_proxy_refuses_duplicate_keys_and_nul_in_json_writes_without_calling_salesmsg(runtime, browser, client_for,
                                                                                                upstream):
    await connected_tenant(runtime, browser, "dupes")
    key = await make_api_key(runtime, tenants=["dupes"])
    upstream.controls.reset_counters()
    url = "/api/v1/tenants/dupes/proxy/contacts"
    for raw, code in ((b'{"first_name": "A", "first_name": "B", "number": "+12025550100"}', "duplicate_key"),
                      (b'{"first_name": "A\\u0000B", "number": "+12025550100"}', "invalid_character"),
                      (b'{"tags": [{"name": "x", "name": "y"}]}', "duplicate_key")):
        answer = await client_for.post(url, content=raw, headers={**auth(key), "Content-Type": "application/json"})
        _expect_refused(answer, status=422, code=code)
    answer = await client_for.get("/api/v1/tenants/dupes/proxy/conversations?filter=open&query=a%00b", headers=auth(key))
    _expect_refused(answer, status=400, code="invalid_character")
    await runtime.audit_writer.flush()  # the refused PHI call is audited like any other refusal
    async with runtime.db.session() as session:
        decisions = (await session.scalars(select(AuditEntry.details).where(AuditEntry.action == "proxy.phi_access"))).all()
    assert any(d.get("decision") == "invalid_character" for d in decisions)
    assert not [name for name in upstream.controls.counters() if name.startswith("api.")]
    # a well-formed write still goes through
    good = await client_for.post(url, json={"first_name": "A", "number": "+12025550100"}, headers=auth(key))
    assert good.status_code < 500 and upstream.controls.counter("api.POST /contacts") == 1


async def test_over_deep_json_is_a_4xx(runtime, client_for, operator_key):
    deep = b'{"name": ' + b'{"a": ' * 200 + b'"x"' + b"}" * 200 + b"}"
    answer = await client_for.patch("/api/v1/tenants/victim", content=deep,
                                    headers={**auth(operator_key), "Content-Type": "application/json"})
    _expect_refused(answer, status=400, code="json_too_deep")


async def test_requests_need_exactly_one_host(live_app):
    """RFC 9112 section 3.2: an HTTP/1.1 request without a Host, or any with two, is answered 400;
    HTTP/1.0 may leave it out."""
    proxy = "/api/v1/tenants/victim/proxy/conversations"  # the proxy applies the rule itself
    cases = [("1.1", [], 400, "/healthz"), ("1.1", [(b"host", b"127.0.0.1:8000"), (b"host", b"evil.example")], 400, "/healthz"),
             ("1.0", [(b"host", b"a"), (b"host", b"b")], 400, "/healthz"), ("1.0", [], 200, "/healthz"),
             ("1.1", [(b"host", b"127.0.0.1")], 200, "/healthz"), ("1.1", [], 400, proxy),
             ("1.1", [(b"host", b"a"), (b"host", b"b")], 400, proxy)]
    for version, headers, expected, path in cases:
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": version, "method": "GET", "scheme": "http",
                 "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
                 "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "app": live_app, "state": {}}
        await live_app(scope, receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        assert start["status"] == expected, (version, headers)
        if expected == 400:
            body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
            assert json.loads(body)["error"]["code"] == "invalid_host"
