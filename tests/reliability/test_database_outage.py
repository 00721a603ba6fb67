"""PostgreSQL goes away under a running `serve` process, then comes back (the TCP fault proxy).

``down()`` cuts every open database connection and refuses new ones, as a restarting server
does. While it is down, callers get documented 503s with a JSON error (never our 500 or a stack
trace), /healthz stays 200 and /readyz answers 503; when it is back, the same process serves
again by itself; and no connection row is left half-written.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter

import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.reliability.support import (
    RefusingPostgres,
    apoll,
    assert_documented_5xx,
    assert_settled_truthfully,
    auth,
    check_row,
    counter_at_least,
    cut_once_at_salesmsg,
    error_code,
    expire_everywhere,
    proxy_url,
    serve_env,
    serving,
    settle,
)
from tests.support.journeys import connected_tenant, make_api_key

pytestmark = pytest.mark.usefixtures("requires_postgres")

SLUG = "db-outage"
GET = proxy_url(SLUG, "conversations?limit=3")


@pytest.fixture
def pg_link(database_url):
    url = make_url(database_url)
    with RefusingPostgres(url.host or "127.0.0.1", url.port or 5432) as link:
        yield link


@pytest.fixture
def via_link(database_url, pg_link) -> str:
    return make_url(database_url).set(host="127.0.0.1", port=pg_link.port).render_as_string(hide_password=False)


@pytest.fixture
async def key(runtime, browser, upstream):
    await connected_tenant(runtime, browser, SLUG)
    return await make_api_key(runtime, tenants=[SLUG])


async def _status(http: httpx.AsyncClient, url: str) -> int:
    try:
        return (await http.get(url, timeout=10)).status_code
    except httpx.HTTPError:
        return 0


async def _thread(http: httpx.AsyncClient, app, key: str, conversation: int) -> list[str]:
    """Every message body of the conversation, all pages."""
    bodies: list[str] = []
    page, last = 1, 1
    while page <= last:
        response = await http.get(app.url(proxy_url(SLUG, f"messages/{conversation}/paginated?page={page}&per_page=100")),
                                  headers=auth(key))
        assert response.status_code == 200, response.text
        bodies += [m["body"] for m in response.json()["data"]]
        last, page = response.json()["meta"]["last_page"], page + 1
    return bodies


async def test_postgres_restarting_during_traffic(key, connected_settings, upstream, tmp_path, pg_link, via_link):
    env = serve_env(connected_settings, database_url=via_link)
    with serving(env, tmp_path, name="db-outage", ready="/readyz") as app:
        async with httpx.AsyncClient(timeout=60) as http:
            first = await http.get(app.url(proxy_url(SLUG, "conversations?limit=1")), headers=auth(key))
            assert first.status_code == 200, first.text
            conversation = first.json()[0]["id"]
            phase = "before"
            seen: list[tuple[str, str, int, str | None, str]] = []  # phase, kind, status, code, text
            stop = asyncio.Event()

            async def caller(worker: int) -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    at = phase
                    if n % 3 == 0:
                        text = f"db-{worker}-{n}-{uuid.uuid4().hex[:6]}"
                        response = await http.post(app.url(proxy_url(SLUG, f"conversations/{conversation}/send")),
                                                   headers={**auth(key), "Idempotency-Key": text}, json={"message": text})
                        kind = "send"
                    else:
                        text, kind = "", "get"
                        response = await http.get(app.url(GET), headers=auth(key))
                    if response.status_code >= 500:
                        assert_documented_5xx(response)
                        assert "retry-after" in response.headers
                    # a call that began in one phase and ended in another counts as a transition
                    seen.append((at if at == phase else "transition", kind, response.status_code, error_code(response), text))
                    await asyncio.sleep(0.05)

            def answered(in_phase: str, count: int):
                async def check() -> bool:
                    return sum(1 for s in seen if s[0] == in_phase) >= count
                return check

            callers = [asyncio.ensure_future(caller(i)) for i in range(4)]
            try:
                await apoll(answered("before", 20), what="traffic before the outage")
                phase = "down"
                pg_link.down()
                await apoll(lambda: _is(http, app.url("/readyz"), 503), timeout=20, what="/readyz 503")
                assert await _status(http, app.url("/healthz")) == 200
                await apoll(answered("down", 20), timeout=60, what="traffic during the outage")
                management = await http.get(app.url(f"/api/v1/tenants/{SLUG}/connection"), headers=auth(key))
                assert assert_documented_5xx(management, allowed={503}) == "service_unavailable"
                assert await _status(http, app.url("/healthz")) == 200
                phase = "recovering"
                pg_link.up()
                await apoll(lambda: _is(http, app.url("/readyz"), 200), timeout=30, what="/readyz 200 again")
                await apoll(lambda: _is(http, app.url(GET), 200, headers=auth(key)), timeout=30, what="a proxied call to work again")
                phase = "after"
                await apoll(answered("after", 30), timeout=60, what="traffic after the outage")
            finally:
                stop.set()
                await asyncio.gather(*callers, return_exceptions=True)
            for task in callers:
                if task.exception() is not None:
                    raise task.exception()
            assert app.served.proc.poll() is None  # the same process, never restarted
            thread = await _thread(http, app, key, conversation)
    by_phase = {p: Counter((s[2], s[3]) for s in seen if s[0] == p) for p in ("before", "transition", "down", "recovering", "after")}
    print(f"\nanswers by phase (status, our code): {json.dumps({p: {f'{k[0]} {k[1]}': v for k, v in c.items()} for p, c in by_phase.items()})}")
    assert set(by_phase["before"]) <= {(200, None), (201, None)}
    assert set(by_phase["down"]) == {(503, "service_unavailable")}, by_phase["down"]  # while down: 503, JSON
    for moving in ("transition", "recovering"):
        assert set(by_phase[moving]) <= {(200, None), (201, None), (503, "service_unavailable")}, by_phase[moving]
    assert set(by_phase["after"]) <= {(200, None), (201, None)}, by_phase["after"]
    # every acknowledged send is in the thread once; one refused while the database was down is
    # nowhere (a send cut between Salesmsg's answer and our write has its own test below)
    for at, kind, status, _code, text in seen:
        if kind == "send":
            expected = {1} if status == 201 else {0} if at == "down" else {0, 1}
            assert thread.count(text) in expected, (at, status, text, thread.count(text))


@pytest.mark.parametrize(("sqlstate", "message"), [
    ("57P03", "the database system is starting up"),  # what a restarting PostgreSQL answers first
    ("53300", "sorry, too many clients already"),  # max_connections reached
])
async def test_postgres_refusing_new_clients_is_503_not_500(key, connected_settings, tmp_path, pg_link, via_link, sqlstate, message):
    """PostgreSQL is reachable but refuses every new session with a FATAL error: the same
    documented 503 as when it is down, /readyz 503, and service resumes by itself."""
    env = serve_env(connected_settings, database_url=via_link)
    with serving(env, tmp_path, name=f"db-refuses-{sqlstate}", ready="/readyz") as app:
        async with httpx.AsyncClient(timeout=60) as http:
            assert (await http.get(app.url(GET), headers=auth(key))).status_code == 200
            pg_link.refuse_with = (sqlstate, message)
            pg_link.down()  # the open sessions end (a restart), new ones meet the refusal
            pg_link.up()
            try:
                await apoll(lambda: _is(http, app.url("/readyz"), 503), timeout=20, what="/readyz 503")
                answers = [await http.get(app.url(GET), headers=auth(key)) for _ in range(5)]
                answers.append(await http.get(app.url(f"/api/v1/tenants/{SLUG}/connection"), headers=auth(key)))
                assert await _status(http, app.url("/healthz")) == 200
            finally:
                pg_link.refuse_with = None
            await apoll(lambda: _is(http, app.url(GET), 200, headers=auth(key)), timeout=30, what="a proxied call to work again")
    for answer in answers:
        assert assert_documented_5xx(answer, allowed={503}) == "service_unavailable"


async def _is(http: httpx.AsyncClient, url: str, status: int, **kwargs) -> bool:
    try:
        return (await http.get(url, timeout=10, **kwargs)).status_code == status
    except httpx.HTTPError:
        return False


async def _tenant_id(runtime):
    from app.tenants.registry import get_tenant

    async with runtime.db.session() as session:
        return (await get_tenant(session, SLUG)).id


async def test_a_refresh_cut_off_by_the_outage_leaves_a_whole_row_and_settles_truthfully(
    key, runtime, connected_settings, upstream, tmp_path, pg_link, via_link
):
    """Salesmsg answers the refresh (and rotates) while the database is gone: the row keeps the
    old tokens or has the new ones, never a mix, and the connection then ends usable or flagged."""
    tenant_id = await _tenant_id(runtime)
    env = serve_env(connected_settings, database_url=via_link, SMC_REFRESH_LEASE_SECONDS="8")
    with serving(env, tmp_path, name="db-refresh", ready="/readyz") as app:
        async with httpx.AsyncClient(timeout=60) as http:
            await expire_everywhere(runtime, upstream, tenant_id)
            upstream.controls.slow_token(2500)  # time to cut the database; under the 4 s call timeout
            upstream.controls.reset_counters()
            try:
                cut = await cut_once_at_salesmsg(http.get(app.url(GET), headers=auth(key)), upstream.controls,
                                                 "token.refresh", pg_link)
                assert assert_documented_5xx(cut, allowed={503}) in ("service_unavailable", "refresh_unavailable")
                await counter_at_least(upstream.controls, "token.refresh.200", 1)  # Salesmsg did refresh
            finally:
                pg_link.up()
                upstream.controls.slow_token(0)
            await apoll(lambda: _is(http, app.url("/readyz"), 200), timeout=30, what="/readyz 200 again")
            row = await check_row(runtime, tenant_id)  # whole: tokens open, version agrees with the events
            assert row.conn.version in (1, 2)
            final = await settle(http, app.url(GET), key)
            connection = (await http.get(app.url(f"/api/v1/tenants/{SLUG}/connection"), headers=auth(key))).json()
            events = [e["type"] for e in (await http.get(app.url(f"/api/v1/tenants/{SLUG}/events"), headers=auth(key))).json()["data"]]
    outcome = await assert_settled_truthfully(runtime, upstream, tenant_id, final, connection, events)
    print(f"\nrefresh cut off by the outage: row kept version {row.conn.version}, ended {outcome}")


async def test_a_refresh_answered_during_a_short_outage_is_stored_when_the_database_is_back(
    key, runtime, connected_settings, upstream, tmp_path, pg_link, via_link
):
    """Salesmsg has rotated the refresh token and the database is away for a second: the new
    tokens are written once it is back (losing them would lose the grant), the caller gets its
    data, and the next refresh works with the stored refresh token."""
    tenant_id = await _tenant_id(runtime)
    env = serve_env(connected_settings, database_url=via_link, SMC_REFRESH_LEASE_SECONDS="30")
    with serving(env, tmp_path, name="db-refresh-blip", ready="/readyz") as app:
        async with httpx.AsyncClient(timeout=60) as http:
            await expire_everywhere(runtime, upstream, tenant_id)
            upstream.controls.slow_token(1500)
            upstream.controls.reset_counters()
            call = asyncio.ensure_future(http.get(app.url(GET), headers=auth(key)))
            try:
                await counter_at_least(upstream.controls, "token.refresh", 1)
                pg_link.down()
                await counter_at_least(upstream.controls, "token.refresh.200", 1)  # rotated at Salesmsg
                await asyncio.sleep(1.5)  # our write meets the outage and waits
            finally:
                pg_link.up()
                upstream.controls.slow_token(0)
            answer = await call
            assert answer.status_code == 200, answer.text
            row = await check_row(runtime, tenant_id)
            assert row.conn.status == "active" and row.conn.version == 2
            await expire_everywhere(runtime, upstream, tenant_id)  # the stored refresh token is the live one
            again = await http.get(app.url(GET), headers=auth(key))
            assert again.status_code == 200, again.text
            assert upstream.controls.counter("token.refresh.200") == 2
    assert (await check_row(runtime, tenant_id)).conn.version == 3


async def test_a_phi_call_served_while_the_database_restarts_is_still_audited(
    key, runtime, connected_settings, upstream, tmp_path, pg_link, via_link
):
    """The data reached the caller while PostgreSQL was away: its audit record waits in the
    queue and is written when the database is back (it once was dropped after 0.6 s)."""
    env = serve_env(connected_settings, database_url=via_link)
    operator_key = await make_api_key(runtime, operator=True, name="ops")
    request_id = f"phi-during-outage-{uuid.uuid4().hex[:8]}"
    with serving(env, tmp_path, name="db-audit", ready="/readyz") as app:
        async with httpx.AsyncClient(timeout=60) as http:
            upstream.controls.reset_counters()
            upstream.controls.set_latency(1500)
            try:
                served = await cut_once_at_salesmsg(
                    http.get(app.url(GET), headers={**auth(key), "X-Request-ID": request_id}), upstream.controls,
                    "api.GET /conversations", pg_link,
                )
                assert served.status_code == 200  # the data reached the caller: conversations are PHI
                outage_ends = time.monotonic() + 3  # a short restart
                while time.monotonic() < outage_ends:
                    assert await _status(http, app.url("/healthz")) == 200
                    await asyncio.sleep(0.2)
            finally:
                pg_link.up()
                upstream.controls.set_latency(0)
            await apoll(lambda: _is(http, app.url("/readyz"), 200), timeout=30, what="/readyz 200 again")

            async def audited() -> bool:
                export = await http.get(app.url("/api/v1/audit"), headers=auth(operator_key))
                assert export.status_code == 200
                return any(json.loads(line).get("request_id") == request_id for line in export.text.splitlines())

            await apoll(audited, timeout=8, interval=0.5, what="the PHI access record")


async def test_a_send_salesmsg_accepted_while_the_database_went_away_is_answered_as_sent(
    key, runtime, connected_settings, upstream, tmp_path, pg_link, via_link
):
    """Salesmsg sent it, then our write of the answer failed: the caller still hears 201 (it once
    heard 503 'try again', and a new key would have sent the message twice), and a retry with
    the key, once the database is back, replays the answer without sending again."""
    env = serve_env(connected_settings, database_url=via_link, SMC_SALESMSG_TIMEOUT_SECONDS="3")
    with serving(env, tmp_path, name="db-send", ready="/readyz") as app:
        async with httpx.AsyncClient(timeout=60) as http:
            first = await http.get(app.url(proxy_url(SLUG, "conversations?limit=1")), headers=auth(key))
            conversation = first.json()[0]["id"]
            url = app.url(proxy_url(SLUG, f"conversations/{conversation}/send"))
            text = f"accepted-{uuid.uuid4().hex[:8]}"
            headers = {**auth(key), "Idempotency-Key": text}
            upstream.controls.reset_counters()
            upstream.controls.set_latency(1500)
            try:
                sent = await cut_once_at_salesmsg(http.post(url, headers=headers, json={"message": text}),
                                                  upstream.controls, "api.POST /conversations/{id}/send", pg_link)
            finally:
                pg_link.up()
                upstream.controls.set_latency(0)
            await apoll(lambda: _is(http, app.url("/readyz"), 200), timeout=30, what="/readyz 200 again")
            assert (await _thread(http, app, key, conversation)).count(text) == 1  # Salesmsg did send it
            assert sent.status_code == 201, (sent.status_code, sent.text)  # ... so the caller must hear so
            async def replayed() -> bool:  # the answer is stored in the background once the database is back
                retry = await http.post(url, headers=headers, json={"message": text})
                assert retry.status_code in (201, 409), retry.text
                return retry.status_code == 201 and retry.headers.get("idempotent-replayed") == "true" and retry.json()["id"] == sent.json()["id"]

            await apoll(replayed, timeout=60, interval=0.5, what="the stored answer to be replayed")
            assert (await _thread(http, app, key, conversation)).count(text) == 1
            assert upstream.controls.counter("api.POST /conversations/{id}/send") == 1
