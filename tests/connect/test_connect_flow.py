"""The connect journey against the emulator: consent, authorize, callback, vault, BAA gating."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select, text

from app.connections import store
from app.core.models import Connection, OAuthState
from app.vault import tenant_keys
from tests.support.journeys import (
    HIPAA_USER,
    PLAIN_USER,
    make_tenant,
    make_user,
    query_of,
)

BASIC = ["teams:read", "users:read"]
PHI = ["messages:read", "conversations:read"]


@pytest.fixture
async def operator(runtime, browser):
    await make_user(runtime, "op@example.com")
    response = await browser.login("op@example.com")
    assert response.status_code == 303
    return browser


async def _connection(runtime, tenant_id) -> Connection | None:
    async with runtime.db.session() as session:
        return await store.get_connection(session, tenant_id)


async def _raw_rows(runtime) -> str:
    """Every column of every connection and state row, as the database returns it."""
    async with runtime.db.session() as session:
        dump = []
        for table in ("connections", "oauth_states", "audit_log", "connection_events"):
            for row in (await session.execute(text(f"SELECT * FROM {table}"))).all():
                dump.append(repr(tuple(row)))
        return "\n".join(dump)


async def test_connect_end_to_end_stores_only_ciphertext(runtime, operator, upstream):
    tenant = await make_tenant(runtime, "corner-bakery", hipaa=False)
    answer = await operator.connect("corner-bakery", BASIC + PHI, user_id=PLAIN_USER)
    assert answer.status_code == 303 and answer.headers["location"] == "/t/corner-bakery/connected"
    conn = await _connection(runtime, tenant.id)
    assert conn is not None and conn.status == "active" and conn.kind == "oauth"
    assert set(conn.scopes.split()) == set(BASIC + PHI)
    assert conn.salesmsg_user == "casey@corner-bakery.example"
    async with runtime.db.session() as session:
        key = await tenant_keys.load_data_key(session, runtime.data_keys, tenant.id)
    access = store.open_access_token(conn, key)
    refresh = store.open_refresh_token(conn, key)
    assert access.count(".") == 2 and refresh
    raw = await _raw_rows(runtime)
    for secret in (access, refresh):
        assert secret not in raw
        assert secret.encode().hex() not in raw
    page = await operator.get("/t/corner-bakery")
    assert "active" in page.text and "conversations:read" in page.text
    assert upstream.controls.counter("token.authorization_code") == 1


async def test_pkce_and_space_separated_scopes_reach_salesmsg(runtime, operator):
    await make_tenant(runtime, "pkce", hipaa=False)
    started = await operator.start_connect("pkce", BASIC)
    params = query_of(started.headers["location"])
    assert params["scope"] == "teams:read users:read"
    assert params["code_challenge_method"] == "S256" and len(params["code_challenge"]) >= 43
    assert params["redirect_uri"] == "http://127.0.0.1:8000/oauth/callback"
    assert params["response_type"] == "code" and len(params["state"]) >= 32
    async with runtime.db.session() as session:
        state = (await session.scalars(select(OAuthState))).one()
    assert state.state_hash != params["state"] and params["state"] not in repr(state.__dict__)
    assert state.pkce_verifier_ct is not None


async def test_replayed_callback_is_refused_and_creates_nothing_more(runtime, operator, upstream):
    tenant = await make_tenant(runtime, "replay", hipaa=False)
    started = await operator.start_connect("replay", BASIC)
    callback = await operator.approve_at_emulator(started.headers["location"], user_id=PLAIN_USER)
    first = await operator.follow_callback(callback)
    assert first.status_code == 303
    version = (await _connection(runtime, tenant.id)).version
    again = await operator.follow_callback(callback)
    assert again.status_code == 400
    assert "already used" in again.text and "state_used" in again.text
    assert (await _connection(runtime, tenant.id)).version == version
    assert upstream.controls.counter("token.authorization_code") == 1


async def test_forged_state_is_refused(runtime, operator):
    tenant = await make_tenant(runtime, "forged", hipaa=False)
    answer = await operator.get("/oauth/callback?state=forged-state-value&code=whatever")
    assert answer.status_code == 400 and "invalid_state" in answer.text
    answer = await operator.get("/oauth/callback?code=whatever")
    assert answer.status_code == 400
    assert await _connection(runtime, tenant.id) is None


async def test_state_from_another_session_is_refused(runtime, operator, live_app, upstream):
    from tests.support.journeys import Browser

    tenant = await make_tenant(runtime, "cross", hipaa=False)
    started = await operator.start_connect("cross", BASIC)
    callback = await operator.approve_at_emulator(started.headers["location"], user_id=PLAIN_USER)
    attacker = Browser(live_app, upstream.url)
    try:
        await make_user(runtime, "other@example.com")
        await attacker.login("other@example.com")
        stolen = await attacker.follow_callback(callback)
        anonymous = Browser(live_app, upstream.url)
        try:
            no_session = await anonymous.follow_callback(callback)
        finally:
            await anonymous.close()
    finally:
        await attacker.close()
    assert stolen.status_code == 400 and "state_session_mismatch" in stolen.text
    assert no_session.status_code == 400
    assert await _connection(runtime, tenant.id) is None
    # the rightful browser can still finish
    assert (await operator.follow_callback(callback)).status_code == 303


async def test_access_denied_at_salesmsg_shows_a_page_and_connects_nothing(runtime, operator):
    tenant = await make_tenant(runtime, "denied", hipaa=False)
    answer = await operator.connect("denied", BASIC, user_id=PLAIN_USER, decision="deny")
    assert answer.status_code == 400
    assert "declined" in answer.text and "access_denied" in answer.text
    assert await _connection(runtime, tenant.id) is None


async def test_tampered_phi_scope_is_refused_before_salesmsg(runtime, operator, upstream):
    tenant = await make_tenant(runtime, "acme-clinic", hipaa=True)
    consent = await operator.get("/t/acme-clinic/connect")
    assert "PHI scopes are locked" in consent.text
    assert re.search(r'value="messages:read"[^>]*disabled', consent.text)
    assert not re.search(r'value="teams:read"[^>]*disabled', consent.text)
    refused = await operator.start_connect("acme-clinic", BASIC + ["messages:read"])
    assert refused.status_code == 403
    assert "Business Associate Agreement" in refused.text
    assert "location" not in refused.headers
    async with runtime.db.session() as session:
        assert (await session.scalars(select(OAuthState))).first() is None
    assert upstream.controls.counter("token.authorization_code") == 0
    assert await _connection(runtime, tenant.id) is None


async def test_signing_the_baa_unlocks_phi_and_revoking_locks_it_on_the_next_request(runtime, operator, upstream):
    await make_tenant(runtime, "acme-clinic", hipaa=True)
    signed = await operator.post_form(
        "/t/acme-clinic/baa", {"reference": "BAA-2026-01", "confirm": "yes"}, csrf_from="/t/acme-clinic"
    )
    assert signed.status_code == 303
    consent = await operator.get("/t/acme-clinic/connect")
    assert "PHI scopes are locked" not in consent.text
    # Salesmsg itself still wants its own BAA with the integrator:
    refused = await operator.connect("acme-clinic", BASIC + PHI, user_id=HIPAA_USER)
    assert refused.status_code == 403
    assert "Access denied. You must have a signed Business Associate Agreement (BAA) to continue." in refused.text
    upstream.controls.set_client_baa("connect-client", True)
    ok = await operator.connect("acme-clinic", BASIC + PHI, user_id=HIPAA_USER)
    assert ok.status_code == 303
    revoked = await operator.post_form("/t/acme-clinic/baa/revoke", {"confirm": "yes", "reason": "ended"}, csrf_from="/t/acme-clinic")
    assert revoked.status_code == 303
    consent = await operator.get("/t/acme-clinic/connect")
    assert "PHI scopes are locked" in consent.text
    assert (await operator.start_connect("acme-clinic", PHI)).status_code == 403
    tenant_page = await operator.get("/t/acme-clinic")
    assert "blocked: no BAA" in tenant_page.text


async def test_reconnect_replaces_the_tokens_of_the_same_connection(runtime, operator):
    tenant = await make_tenant(runtime, "again", hipaa=False)
    await operator.connect("again", BASIC, user_id=PLAIN_USER)
    first = await _connection(runtime, tenant.id)
    await operator.connect("again", BASIC + ["tags:read"], user_id=PLAIN_USER)
    second = await _connection(runtime, tenant.id)
    assert second.id == first.id and second.version == first.version + 1
    assert second.access_token_ct != first.access_token_ct
    assert "tags:read" in second.scopes.split()


async def test_ciphertext_copied_into_another_tenants_row_does_not_decrypt(runtime, operator):
    a = await make_tenant(runtime, "tenant-a", hipaa=False)
    b = await make_tenant(runtime, "tenant-b", hipaa=False)
    await operator.connect("tenant-a", BASIC, user_id=PLAIN_USER)
    await operator.connect("tenant-b", BASIC, user_id=PLAIN_USER)
    async with runtime.db.session() as session:
        conn_a = await store.get_connection(session, a.id)
        conn_b = await store.get_connection(session, b.id)
        conn_b.access_token_ct = conn_a.access_token_ct
    report = await tenant_keys.verify_all(runtime.db, runtime.data_keys)
    assert not report.ok
    assert any("tenant-b" in failure for failure in report.failures)
    assert not any("tenant-a" in failure for failure in report.failures)


async def test_disconnect_shreds_tokens_and_audits(runtime, operator, upstream):
    tenant = await make_tenant(runtime, "bye", hipaa=False)
    await operator.connect("bye", BASIC, user_id=PLAIN_USER)
    answer = await operator.post_form("/t/bye/disconnect", {}, csrf_from="/t/bye")
    assert answer.status_code == 303
    conn = await _connection(runtime, tenant.id)
    assert conn.status == "disconnected" and conn.access_token_ct is None and conn.refresh_token_ct is None
    audit_page = await operator.get("/audit?tenant=bye")
    assert "connection.disconnect" in audit_page.text and "connection.connect" in audit_page.text


async def test_pat_connection_is_checked_and_not_baa_gated(runtime, operator):
    from tests.support.journeys import PAT

    tenant = await make_tenant(runtime, "pat-org", hipaa=True)
    bad = await operator.post_form("/t/pat-org/connect/pat", [("token", "not-a-real-token-value"), ("scope", "teams:read")],
                                   csrf_from="/t/pat-org/connect")
    assert bad.status_code == 422 and "did not accept" in bad.text
    ok = await operator.post_form("/t/pat-org/connect/pat", [("token", PAT), ("scope", "conversations:read"), ("scope", "teams:read")],
                                  csrf_from="/t/pat-org/connect")
    assert ok.status_code == 303
    conn = await _connection(runtime, tenant.id)
    assert conn.kind == "pat" and conn.status == "active" and "conversations:read" in conn.scopes.split()


async def test_a_baa_refusal_sent_as_an_html_page_is_still_a_baa_refusal(runtime, operator, upstream):
    """Some Salesmsg errors come back as HTML: the BAA sentence in a page is read as the BAA refusal."""
    tenant = await make_tenant(runtime, "acme-clinic", hipaa=True)
    await operator.post_form("/t/acme-clinic/baa", {"reference": "BAA-2026-02", "confirm": "yes"}, csrf_from="/t/acme-clinic")
    started = await operator.start_connect("acme-clinic", BASIC + PHI)
    callback = await operator.approve_at_emulator(started.headers["location"], user_id=HIPAA_USER)
    page = ("<!DOCTYPE html><html><head><title>Forbidden</title></head><body><h1>Access denied.</h1>"
            "<p>You must have a signed Business Associate Agreement (BAA) to continue.</p></body></html>")
    upstream.controls.fail_next(1, status=403, path_prefix="/pub/v2.2/oauth/token", method="POST", body=page,
                                content_type="text/html; charset=utf-8")
    refused = await operator.follow_callback(callback)
    assert refused.status_code == 403 and "baa_required" in refused.text
    assert "Access denied. You must have a signed Business Associate Agreement (BAA) to continue." in refused.text
    assert await _connection(runtime, tenant.id) is None
