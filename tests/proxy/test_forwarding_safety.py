"""Forwarding safety: paths stay under the API base, the token goes only to Salesmsg, headers are cleaned."""

from __future__ import annotations

import pytest

from app.audit.audit_log import Actor
from app.connections import transitions
from app.core.errors import Refusal
from app.kit.retry_after import retry_after_seconds
from app.main import create_app
from app.proxy.handler import safe_path
from app.vault import tenant_keys
from tests.support.journeys import connected_tenant, make_api_key, make_tenant
from tests.support.recorder import Recorder


@pytest.mark.parametrize(
    "raw",
    [
        b"../oauth/token",
        b"conversations/../../admin",
        b"%2e%2e/oauth/token",
        b"%2E%2E%2Foauth",
        b"%252e%252e/oauth",
        b"conversations/%2F%2Fevil.example",
        b"/evil.example/x",
        b"conversations//x",
        b"http://evil.example/x",
        b"http:%2F%2Fevil.example",
        b"conversations\\..\\x",
        b"conversations%5c..%5cx",
        b"user@evil.example",
        b"conversations%40evil.example",
        b"conversations%00",
        b"conversations%0d%0aHost:%20evil",
        b"conversations/%09",
        b"conversations/\xc3\xa9",
        b".",
        b"",
    ],
)
def test_unsafe_paths_are_refused(raw):
    with pytest.raises(Refusal) as info:
        safe_path(raw)
    assert info.value.status_code == 400


@pytest.mark.parametrize("raw", [b"conversations", b"conversations/5001/messages", b"messages/5001/paginated", b"users/me", b"contacts/abc-DEF_1.2"])
def test_safe_paths_pass(raw):
    assert safe_path(raw) == raw.decode()


def test_retry_after_parses_seconds_and_dates():
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


@pytest.fixture
def recorder():
    with Recorder() as server:
        yield server


@pytest.fixture
async def recorded_app(connected_settings, recorder):
    """The app with a recording server as its Salesmsg, and one tenant holding a known token."""
    settings = connected_settings.model_copy(update={"salesmsg_api_base": recorder.url + "/pub/v2.2"})
    app = create_app(settings, configure_logs=False)
    async with app.router.lifespan_context(app):
        runtime = app.state.runtime
        tenant = await make_tenant(runtime, "rec", hipaa=False)
        async with runtime.db.session() as session:
            key = await tenant_keys.load_data_key(session, runtime.data_keys, tenant.id)
            await transitions.connected(
                session, tenant=tenant, key=key, kind="oauth", access_token="upstream-token-123",
                refresh_token="refresh-abc", expires_in=3600, granted_scopes=["contacts:read", "contacts:write", "teams:read"],
                actor=Actor.system(),
            )
        yield app


async def _client(app):
    import httpx

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://127.0.0.1:8000")


async def test_caller_credentials_and_hop_by_hop_headers_are_not_forwarded(recorded_app, recorder):
    api_key = await make_api_key(recorded_app.state.runtime, tenants=["rec"])
    async with await _client(recorded_app) as client:
        response = await client.post(
            "/api/v1/tenants/rec/proxy/contacts?search=x",
            headers={
                "Authorization": f"Bearer {api_key}", "Cookie": "session=abc", "X-Forwarded-For": "10.0.0.1",
                "X-Forwarded-Host": "evil.example", "Forwarded": "for=1.2.3.4", "Connection": "keep-alive, X-Secret",
                "X-Secret": "hop", "Proxy-Authorization": "Basic x", "TE": "trailers", "Upgrade": "websocket",
                "Accept": "application/json", "Content-Type": "application/json", "X-Request-ID": "req-abcdefgh",
            },
            content=b'{"number": "+12025550100"}',
        )
    assert response.status_code == 200
    seen = recorder.seen[-1]
    assert seen.method == "POST" and seen.path == "/pub/v2.2/contacts?search=x"
    assert seen.body == b'{"number": "+12025550100"}'
    assert seen.headers["authorization"] == "Bearer upstream-token-123"
    assert seen.headers["host"] == recorder.url.split("//")[1]
    for dropped in ("cookie", "x-forwarded-for", "x-forwarded-host", "forwarded", "x-secret", "proxy-authorization", "te", "upgrade"):
        assert dropped not in seen.headers, dropped
    assert seen.headers["accept"] == "application/json" and seen.headers["x-request-id"] == "req-abcdefgh"
    assert api_key not in str(seen.headers)


async def test_redirects_are_not_followed_and_cookies_not_relayed(recorded_app, recorder):
    api_key = await make_api_key(recorded_app.state.runtime, tenants=["rec"])
    recorder.json_reply(302, {"moved": True}, Location="http://127.0.0.1:9/steal", **{"Set-Cookie": "upstream=1"})
    async with await _client(recorded_app) as client:
        response = await client.get("/api/v1/tenants/rec/proxy/teams", headers={"Authorization": f"Bearer {api_key}"})
    assert response.status_code == 302
    assert response.json() == {"moved": True}
    assert "location" not in response.headers and "set-cookie" not in response.headers
    assert len(recorder.seen) == 1


async def test_nothing_reaches_another_host_through_the_path(runtime, browser, client_for, upstream, recorder):
    await connected_tenant(runtime, browser, "ssrf")
    key = await make_api_key(runtime, tenants=["ssrf"])
    target = recorder.url.split("//")[1]
    before = upstream.controls.counters()
    attempts = [
        f"http://{target}/x", f"http:%2F%2F{target}/x", f"%2F%2F{target}/x", f"@{target}/x", f"conversations%40{target}",
        f"..%2F..%2F..%2F{target}", f"conversations/..%2f..%2f{target}", "%2e%2e/%2e%2e/pub/v2.2/oauth/token",
    ]
    for attempt in attempts:
        response = await client_for.get(f"/api/v1/tenants/ssrf/proxy/{attempt}", headers={"Authorization": f"Bearer {key}"})
        assert 400 <= response.status_code < 500, (attempt, response.status_code)
    assert recorder.seen == []
    after = upstream.controls.counters()
    assert {k: v for k, v in after.items() if k.startswith("api.")} == {k: v for k, v in before.items() if k.startswith("api.")}
