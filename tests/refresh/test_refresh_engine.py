"""The refresh engine against the emulator, which rotates refresh tokens and revokes a grant on reuse."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update

from app.audit.audit_log import Actor
from app.connections import store, webhooks
from app.connections.view import ConnectionView
from app.core.models import Connection, ConnectionEvent, WebhookDelivery
from app.tenants.registry import get_tenant
from app.vault import tenant_keys
from tests.support.journeys import auth, connect_pat, connected_tenant, make_api_key
from tests.support.recorder import Recorder

CONVERSATIONS = "/api/v1/tenants/{t}/proxy/conversations?limit=3"



async def _conn(runtime, tenant_id) -> Connection:
    async with runtime.db.session() as session:
        return await store.get_connection(session, tenant_id)


async def _tokens(runtime, conn: Connection) -> tuple[str, str | None]:
    async with runtime.db.session() as session:
        key = await tenant_keys.load_data_key(session, runtime.data_keys, conn.tenant_id)
    return store.open_access_token(conn, key), store.open_refresh_token(conn, key)


async def _expire_in_db(runtime, tenant_id, *, seconds: float = -60) -> None:
    async with runtime.db.session() as session:
        await session.execute(
            update(Connection).where(Connection.tenant_id == tenant_id)
            .values(access_expires_at=datetime.now(UTC) + timedelta(seconds=seconds))
        )


async def _events(runtime, tenant_id) -> list[str]:
    async with runtime.db.session() as session:
        rows = await session.scalars(select(ConnectionEvent.type).where(ConnectionEvent.tenant_id == tenant_id).order_by(ConnectionEvent.id))
        return list(rows.all())


async def test_a_valid_token_is_used_without_refreshing(runtime, browser, upstream):
    tenant = await connected_tenant(runtime, browser, "steady")
    conn = await _conn(runtime, tenant.id)
    token = await runtime.refresher.access_token(ConnectionView.of(conn))
    assert token.value == (await _tokens(runtime, conn))[0]
    assert upstream.controls.counter("token.refresh") == 0


async def test_many_concurrent_callers_in_one_process_refresh_once(runtime, browser, client_for, upstream):
    tenant = await connected_tenant(runtime, browser, "crowd")
    key = await make_api_key(runtime, tenants=["crowd"])
    old_access, old_refresh = await _tokens(runtime, await _conn(runtime, tenant.id))
    await _expire_in_db(runtime, tenant.id)
    upstream.controls.expire_tokens(org_id=3)
    responses = await asyncio.gather(*(client_for.get(CONVERSATIONS.format(t="crowd"), headers=auth(key)) for _ in range(50)))
    assert [r.status_code for r in responses] == [200] * 50
    assert upstream.controls.counter("token.refresh") == 1
    conn = await _conn(runtime, tenant.id)
    new_access, new_refresh = await _tokens(runtime, conn)
    assert new_access != old_access and new_refresh != old_refresh and conn.version == 2
    assert conn.access_expires_at > datetime.now(UTC) + timedelta(hours=23)


async def test_missing_refresh_token_in_the_answer_keeps_the_old_one(runtime, browser, client_for, upstream):
    tenant = await connected_tenant(runtime, browser, "keeper")
    key = await make_api_key(runtime, tenants=["keeper"])
    _, refresh_before = await _tokens(runtime, await _conn(runtime, tenant.id))
    upstream.controls.omit_refresh_token(True)
    assert (await client_for.post("/api/v1/tenants/keeper/connection/refresh", headers=auth(key))).status_code == 200
    access_mid, refresh_mid = await _tokens(runtime, await _conn(runtime, tenant.id))
    assert refresh_mid == refresh_before
    upstream.controls.omit_refresh_token(False)
    assert (await client_for.post("/api/v1/tenants/keeper/connection/refresh", headers=auth(key))).status_code == 200
    access_after, refresh_after = await _tokens(runtime, await _conn(runtime, tenant.id))
    assert refresh_after != refresh_before and access_after != access_mid
    assert upstream.controls.counter("token.refresh.200") == 2
    assert upstream.controls.counter("grant.reuse_detected") == 0


async def test_invalid_grant_flags_needs_reauth_emits_and_stops_refreshing(runtime, browser, client_for, upstream):
    tenant = await connected_tenant(runtime, browser, "revoked")
    key = await make_api_key(runtime, tenants=["revoked"])
    upstream.controls.revoke(org_id=3)
    await _expire_in_db(runtime, tenant.id)
    first = await client_for.get(CONVERSATIONS.format(t="revoked"), headers=auth(key))
    assert first.status_code == 409 and first.json()["error"]["code"] == "connection_needs_reauth"
    conn = await _conn(runtime, tenant.id)
    assert conn.status == "needs_reauth" and conn.last_error == "invalid_grant"
    assert "needs_reauth" in await _events(runtime, tenant.id)
    attempts = upstream.controls.counter("token.refresh")
    for _ in range(3):
        again = await client_for.get(CONVERSATIONS.format(t="revoked"), headers=auth(key))
        assert again.status_code == 409
    assert upstream.controls.counter("token.refresh") == attempts == 1
    export = (await client_for.get("/api/v1/audit", headers=auth(await make_api_key(runtime, operator=True, name="ops")))).text
    assert any(json.loads(line)["action"] == "connection.needs_reauth" for line in export.splitlines())


async def test_transient_failure_keeps_the_old_token_then_recovers(runtime, browser, client_for, upstream):
    tenant = await connected_tenant(runtime, browser, "flaky")
    key = await make_api_key(runtime, tenants=["flaky"])
    runtime.refresher.settings = runtime.settings.model_copy(update={"refresh_backoff_base_seconds": 0.01, "refresh_backoff_max_seconds": 0.02})
    await _expire_in_db(runtime, tenant.id, seconds=60)  # inside the margin, still valid
    upstream.controls.fail_next(1, status=503, path_prefix="/pub/v2.2/oauth/token")
    during = await client_for.get(CONVERSATIONS.format(t="flaky"), headers=auth(key))
    assert during.status_code == 200  # the old token, still valid, served the call
    conn = await _conn(runtime, tenant.id)
    assert conn.status == "active" and conn.refresh_failures == 1 and conn.version == 1
    await asyncio.sleep(0.05)
    after = await client_for.get(CONVERSATIONS.format(t="flaky"), headers=auth(key))
    assert after.status_code == 200
    conn = await _conn(runtime, tenant.id)
    assert conn.refresh_failures == 0 and conn.version == 2
    assert (await _events(runtime, tenant.id))[-3:] == ["refresh_failed", "refreshed", "recovered"]


async def test_transient_failures_give_up_after_the_limit(runtime, browser, client_for, upstream):
    tenant = await connected_tenant(runtime, browser, "gives-up")
    runtime.refresher.settings = runtime.settings.model_copy(
        update={"refresh_backoff_base_seconds": 0.001, "refresh_backoff_max_seconds": 0.002, "refresh_max_failures": 3}
    )
    await _expire_in_db(runtime, tenant.id)
    upstream.controls.fail_next(10, status=502, path_prefix="/pub/v2.2/oauth/token")
    key = await make_api_key(runtime, tenants=["gives-up"])
    codes = []
    for _ in range(4):
        codes.append((await client_for.get(CONVERSATIONS.format(t="gives-up"), headers=auth(key))).status_code)
        await asyncio.sleep(0.01)
    assert codes[:2] == [503, 503] and codes[2:] == [409, 409]
    assert (await _conn(runtime, tenant.id)).status == "needs_reauth"
    assert upstream.controls.counter("token.refresh") == 3


async def test_pat_connections_refresh_with_the_pat_as_bearer(runtime, browser, client_for, upstream):
    from app.tenants import registry

    pat = upstream.controls.issue_pat(301, "conversations:read teams:read")
    async with runtime.db.session() as session:
        tenant = await registry.create_tenant(session, keyring=runtime.keyring, slug="pat-refresh", name="P", hipaa=False, actor=Actor.system())
    await connect_pat(runtime, tenant, pat, ["conversations:read", "teams:read"])
    key = await make_api_key(runtime, tenants=["pat-refresh"])
    refreshed = await client_for.post("/api/v1/tenants/pat-refresh/connection/refresh", headers=auth(key))
    assert refreshed.status_code == 200
    assert upstream.controls.counter("token.pat_refresh") == 1
    new_access, refresh = await _tokens(runtime, await _conn(runtime, tenant.id))
    assert new_access != pat and refresh is None
    assert (await client_for.get(CONVERSATIONS.format(t="pat-refresh"), headers=auth(key))).status_code == 200


async def test_worker_sweeps_due_connections(runtime, browser, upstream):
    due = await connected_tenant(runtime, browser, "due-soon")
    fresh = await connected_tenant(runtime, browser, "not-due")
    await _expire_in_db(runtime, due.id, seconds=30)
    worker = runtime.new_worker()
    counts = await worker.sweep()
    assert counts["leased"] == 1 and counts["refreshed"] == 1
    assert (await _conn(runtime, due.id)).version == 2 and (await _conn(runtime, fresh.id)).version == 1
    assert (await worker.sweep())["leased"] == 0
    assert upstream.controls.counter("token.refresh") == 1


async def test_webhook_events_are_signed_delivered_and_retried(runtime, browser, upstream):
    with Recorder() as receiver:
        tenant = await connected_tenant(runtime, browser, "hooked")
        async with runtime.db.session() as session:
            row = await get_tenant(session, "hooked")
            secret = await webhooks.set_webhook(session, runtime.data_keys, row, url=receiver.url + "/hook", actor=Actor.system())
        await _expire_in_db(runtime, tenant.id, seconds=30)
        worker = runtime.new_worker()
        receiver.json_reply(500, {"no": "thanks"})
        await worker.sweep()
        await worker.webhooks.deliver_due()
        assert len(receiver.seen) == 1
        async with runtime.db.session() as session:
            delivery = (await session.scalars(select(WebhookDelivery))).one()
            assert delivery.status == "pending" and delivery.attempts == 1 and delivery.last_status_code == 500
            delivery.next_attempt_at = datetime.now(UTC)
        receiver.json_reply(200, {"ok": True})
        await worker.webhooks.deliver_due()
        upstream.controls.revoke(org_id=3)
        await _expire_in_db(runtime, tenant.id, seconds=30)
        await worker.sweep()
        await worker.webhooks.deliver_due()
    assert len(receiver.seen) == 3
    types = []
    for seen in receiver.seen:
        assert webhooks.verify(secret, seen.headers["x-smc-timestamp"], seen.body, seen.headers["x-smc-signature"])
        assert not webhooks.verify("whsec_wrong", seen.headers["x-smc-timestamp"], seen.body, seen.headers["x-smc-signature"])
        payload = json.loads(seen.body)
        assert payload["tenant"]["slug"] == "hooked" and seen.headers["x-smc-event"] == payload["type"]
        assert "token" not in seen.body.decode().lower().replace("refresh_token", "")
        types.append(payload["type"])
    assert types == ["refreshed", "refreshed", "needs_reauth"]
    async with runtime.db.session() as session:
        statuses = (await session.scalars(select(WebhookDelivery.status).order_by(WebhookDelivery.id))).all()
    assert statuses == ["delivered", "delivered"]  # one retried delivery for "refreshed", one for "needs_reauth"
