"""The token endpoint misbehaving, and a server dying in the middle of a refresh.

Salesmsg rotates refresh tokens and revokes the whole grant when a used one comes back, so a
refresh whose answer we never stored can end a connection. What a user relies on is that the
connection never ends silently broken: it ends usable, or flagged ``needs_reauth`` with an
event, and our flag agrees with what Salesmsg did.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import select

from app.core.models import ConnectionEvent
from tests.reliability.support import (
    CountingProxy,
    EmulatorRefreshesInFlight,
    apoll,
    assert_documented_5xx,
    assert_settled_truthfully,
    auth,
    check_row,
    counter_at_least,
    error_code,
    expire_everywhere,
    only_grant,
    proxy_url,
    serve_env,
    serving,
    settle,
    token_works,
)
from tests.support.journeys import connected_tenant, make_api_key

TOKEN_PATHS = "/pub/v2.2/oauth/token"  # also matches /oauth/token/refresh


def _get(slug: str) -> str:
    return proxy_url(slug, "conversations?limit=2")


def _retry_after(form: str, seconds: int) -> str:
    return str(seconds) if form == "seconds" else email.utils.formatdate(time.time() + seconds, usegmt=True)


async def _connection(client, slug: str, key: str) -> dict:
    response = await client.get(f"/api/v1/tenants/{slug}/connection", headers=auth(key))
    assert response.status_code == 200, response.text
    return response.json()


async def _refreshed_payloads(runtime, tenant_id) -> list[dict]:
    async with runtime.db.session() as session:
        rows = await session.scalars(select(ConnectionEvent).where(ConnectionEvent.tenant_id == tenant_id,
                                                                   ConnectionEvent.type == "refreshed").order_by(ConnectionEvent.id))
        return [e.payload["data"] for e in rows.all()]


# -- 429 from the token endpoint ---------------------------------------------------------------


@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_a_429_from_the_token_endpoint_is_transient_and_recovers_by_itself(runtime, browser, client_for, upstream, form):
    tenant = await connected_tenant(runtime, browser, "limited")
    key = await make_api_key(runtime, tenants=["limited"])
    runtime.refresher.settings = runtime.settings.model_copy(update={"refresh_backoff_base_seconds": 1.0,
                                                                     "refresh_backoff_max_seconds": 2.0})
    await expire_everywhere(runtime, upstream, tenant.id)
    upstream.controls.reset_counters()
    upstream.controls.fail_next(1, status=429, path_prefix=TOKEN_PATHS, retry_after=_retry_after(form, 2))
    during = await client_for.get(_get("limited"), headers=auth(key))
    assert assert_documented_5xx(during, allowed={503}) == "refresh_unavailable"
    assert int(during.headers["retry-after"]) >= 1
    connection = await _connection(client_for, "limited", key)
    assert connection["status"] == "active" and not connection["needs_reauth"]
    assert connection["refresh_failures"] == 1 and connection["last_error"] == "429"

    async def recovered() -> bool:
        response = await client_for.get(_get("limited"), headers=auth(key))
        assert response.status_code in (200, 503), response.text
        return response.status_code == 200

    await apoll(recovered, timeout=30, interval=0.2, what="a proxied call to succeed after the cooldown")
    # callers during the cooldown did not hammer the token endpoint: one failure, one success
    assert upstream.controls.counter("token.refresh") == 2
    assert upstream.controls.counter("token.refresh.200") == 1
    row = await check_row(runtime, tenant.id)
    assert row.conn.version == 2 and row.conn.refresh_failures == 0 and row.conn.status == "active"
    assert row.events[-3:] == ["refresh_failed", "refreshed", "recovered"]
    assert token_works(upstream, row.access_token)


@pytest.mark.parametrize("form", ["seconds", "http-date"])
async def test_the_cooldown_after_a_429_honours_the_token_endpoints_retry_after(runtime, browser, client_for, upstream, form):
    """Salesmsg says two minutes: no refresh before, and callers are told so (the cooldown once
    was our own few-second backoff, inside Salesmsg's lock-out)."""
    tenant = await connected_tenant(runtime, browser, "locked-out")
    key = await make_api_key(runtime, tenants=["locked-out"])
    await expire_everywhere(runtime, upstream, tenant.id)
    upstream.controls.reset_counters()
    upstream.controls.fail_next(1, status=429, path_prefix=TOKEN_PATHS, retry_after=_retry_after(form, 120))
    during = await client_for.get(_get("locked-out"), headers=auth(key))
    assert assert_documented_5xx(during, allowed={503}) == "refresh_unavailable"
    row = await check_row(runtime, tenant.id)
    assert row.conn.next_refresh_at is not None
    assert row.conn.next_refresh_at >= datetime.now(UTC) + timedelta(seconds=100), row.conn.next_refresh_at
    assert int(during.headers["retry-after"]) >= 100
    again = await client_for.get(_get("locked-out"), headers=auth(key))
    assert assert_documented_5xx(again, allowed={503}) == "refresh_unavailable"
    assert upstream.controls.counter("token.refresh") == 1  # nobody knocked again meanwhile


# -- answers without a refresh token -----------------------------------------------------------


async def test_several_refresh_answers_in_a_row_without_a_refresh_token_keep_the_grant_alive(runtime, browser, client_for, upstream):
    tenant = await connected_tenant(runtime, browser, "no-rotation")
    key = await make_api_key(runtime, tenants=["no-rotation"])
    original = (await check_row(runtime, tenant.id)).refresh_token
    upstream.controls.omit_refresh_token(True)
    for round_ in range(4):
        if round_ % 2 == 0:
            forced = await client_for.post("/api/v1/tenants/no-rotation/connection/refresh", headers=auth(key))
            assert forced.status_code == 200, forced.text
        else:  # an expired token and a crowd of callers: one refresh
            await expire_everywhere(runtime, upstream, tenant.id)
            crowd = await asyncio.gather(*(client_for.get(_get("no-rotation"), headers=auth(key)) for _ in range(10)))
            assert [r.status_code for r in crowd] == [200] * 10
        row = await check_row(runtime, tenant.id)
        assert row.conn.version == 2 + round_ and row.conn.status == "active"
        assert row.refresh_token == original  # kept, since the answer carried none
        assert token_works(upstream, row.access_token)
    upstream.controls.omit_refresh_token(False)
    rotated = await client_for.post("/api/v1/tenants/no-rotation/connection/refresh", headers=auth(key))
    assert rotated.status_code == 200
    row = await check_row(runtime, tenant.id)
    assert row.refresh_token != original and row.conn.version == 6
    assert [p["rotated"] for p in await _refreshed_payloads(runtime, tenant.id)] == [False] * 4 + [True]
    assert upstream.controls.counter("token.refresh.200") == 5
    assert upstream.controls.counter("grant.reuse_detected") == 0 and not only_grant(upstream)["revoked"]
    assert (await client_for.get(_get("no-rotation"), headers=auth(key))).status_code == 200


# -- a slow token endpoint, real processes -----------------------------------------------------


@pytest.mark.parametrize("style", ["salesmsg", "rfc6749"])
async def test_a_token_endpoint_slower_than_the_lease(runtime, browser, connected_settings, upstream, tmp_path, on_postgres, style):
    """Lease 5 s, so each refresh call gives up after 2.5 s; Salesmsg takes 8 s. Many callers
    on every process: one refresh open at a time from our side, documented 503s meanwhile, and
    an end state that matches Salesmsg's (with ``rfc6749`` the emulator completes the abandoned
    refresh and rotates; on ``/oauth/token/refresh`` it drops a request whose client left)."""
    tenant = await connected_tenant(runtime, browser, "slow-token")
    key = await make_api_key(runtime, tenants=["slow-token"])
    await expire_everywhere(runtime, upstream, tenant.id)
    processes = 2 if on_postgres else 1  # SQLite serves one process
    with CountingProxy("127.0.0.1", upstream.port) as link, ExitStack() as stack:
        env = serve_env(connected_settings, api_base=f"http://127.0.0.1:{link.port}/pub/v2.2",
                        SMC_REFRESH_LEASE_SECONDS="5", SMC_SALESMSG_REFRESH_STYLE=style)
        servers = [stack.enter_context(serving(env, tmp_path, name=f"slow-{i}")) for i in range(processes)]
        upstream.controls.slow_token(8000)
        upstream.controls.reset_counters()
        link.reset_max()
        with EmulatorRefreshesInFlight(upstream.url) as at_salesmsg:
            async with httpx.AsyncClient(timeout=60) as http:
                burst = await asyncio.gather(*(http.get(servers[i % processes].url(_get("slow-token")), headers=auth(key))
                                               for i in range(20)))
                for response in burst:
                    assert assert_documented_5xx(response, allowed={503}) == "refresh_unavailable"
                    assert int(response.headers["retry-after"]) >= 1
                window_end = time.monotonic() + 9  # callers keep coming while Salesmsg still works on it
                i = 0
                while time.monotonic() < window_end:
                    response = await http.get(servers[i % processes].url(_get("slow-token")), headers=auth(key))
                    i += 1
                    assert response.status_code in (503, 409), response.text
                    assert error_code(response) in ("refresh_unavailable", "connection_needs_reauth")
                    await asyncio.sleep(0.2)
                open_at_once = link.max_active
                upstream.controls.slow_token(0)
                final = await settle(http, servers[0].url(_get("slow-token")), key)
                connection = (await http.get(servers[-1].url("/api/v1/tenants/slow-token/connection"), headers=auth(key))).json()
                events = [e["type"] for e in (await http.get(servers[0].url("/api/v1/tenants/slow-token/events"),
                                                             headers=auth(key))).json()["data"]]
    attempts = upstream.controls.counter("token.refresh")
    outcome = await assert_settled_truthfully(runtime, upstream, tenant.id, final, connection, events)
    print(f"\nslow token ({style}, {processes} process(es)): {20 + i} callers, {attempts} refresh requests, "
          f"at most {open_at_once} open from our side, at most {at_salesmsg.max_in_flight} in flight at Salesmsg, "
          f"ended {outcome}")
    assert open_at_once <= 1, f"{open_at_once} refresh requests open at once"
    assert attempts <= 5, f"{attempts} refresh requests: a storm"
    assert "refresh_failed" in events
    if style == "rfc6749":
        assert outcome == "needs_reauth"  # the emulator rotated the token we never got


# -- a server killed mid-refresh -----------------------------------------------------------------


@pytest.mark.parametrize("style", ["salesmsg", "rfc6749"])
async def test_a_server_killed_while_salesmsg_answers_a_refresh(runtime, browser, connected_settings, upstream, tmp_path, style):
    """SIGKILL while the refresh is at Salesmsg: Salesmsg may rotate, our database never hears of
    it. A fresh process must end the connection usable or flagged, never hang, never 500."""
    tenant = await connected_tenant(runtime, browser, "killed")
    key = await make_api_key(runtime, tenants=["killed"])
    await expire_everywhere(runtime, upstream, tenant.id)
    env = serve_env(connected_settings, SMC_REFRESH_LEASE_SECONDS="8", SMC_SALESMSG_REFRESH_STYLE=style)
    upstream.controls.slow_token(3000)  # under the 4 s call timeout (half the lease): only the kill stops it
    upstream.controls.reset_counters()
    with serving(env, tmp_path, name="doomed") as doomed:
        async with httpx.AsyncClient(timeout=60) as http:
            call = asyncio.ensure_future(http.get(doomed.url(_get("killed")), headers=auth(key)))
            await counter_at_least(upstream.controls, "token.refresh", 1)
            doomed.served.kill()
            with pytest.raises(httpx.TransportError):
                await call
    row = await check_row(runtime, tenant.id)  # whole: the old tokens, the dead process's lease
    assert row.conn.version == 1 and row.conn.lease_owner is not None
    upstream.controls.slow_token(0)
    with serving(env, tmp_path, name="restarted") as fresh:
        async with httpx.AsyncClient(timeout=60) as http:
            final = await settle(http, fresh.url(_get("killed")), key)
            connection = (await http.get(fresh.url("/api/v1/tenants/killed/connection"), headers=auth(key))).json()
            events = [e["type"] for e in (await http.get(fresh.url("/api/v1/tenants/killed/events"), headers=auth(key))).json()["data"]]
            again = await http.get(fresh.url(_get("killed")), headers=auth(key))
            assert again.status_code == final.status_code  # it stays where it settled
    outcome = await assert_settled_truthfully(runtime, upstream, tenant.id, final, connection, events)
    print(f"\nkilled mid-refresh ({style}): {upstream.controls.counter('token.refresh')} refresh requests, "
          f"reuse detected {upstream.controls.counter('grant.reuse_detected')}, ended {outcome}")
    if style == "rfc6749":
        assert outcome == "needs_reauth"  # Salesmsg completed the refresh the dead process asked for
