"""Three replicas (`serve --workers 2` each) and a worker behind nginx, on one PostgreSQL and the
machine's Redis: limits, the Salesmsg budget, refresh and revocation hold for the fleet as for one
process, and a replica killed under load loses no accepted send and sends none twice."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import select, update

from app.core.models import ApiKey, Connection
from app.identity import api_keys
from tests.reliability.support import serve_env
from tests.support.fleet import Fleet, nginx_binary
from tests.support.journeys import PASSWORD, PLAIN_ORG, auth, connected_tenant, csrf_of, make_api_key, make_user

pytestmark = [pytest.mark.fleet, pytest.mark.usefixtures("requires_postgres")]

PROXY = "/api/v1/tenants/{slug}/proxy/{path}"
GRANT_BOUND = 0.100  # a change made anywhere applies everywhere within this (app.proxy.grant_cache)


@pytest.fixture(autouse=True)
def _nginx(requires_postgres) -> None:
    if nginx_binary() is None:
        pytest.fail("nginx is missing: apt-get install -y nginx (.ci/run installs it)")


def _env(connected_settings, redis_url: str, **extra: str) -> dict[str, str]:
    return serve_env(connected_settings, SMC_REDIS_URL=redis_url, SMC_LOG_LEVEL="INFO", **extra)


async def _gather_gets(url: str, key: str, count: int, *, concurrency: int = 20) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        return await asyncio.gather(*(client.get(url, headers=auth(key)) for _ in range(count)))


def _codes(responses: list[httpx.Response]) -> Counter[str]:
    return Counter(r.json()["error"]["code"] if r.status_code >= 400 else str(r.status_code) for r in responses)


async def test_rate_limits_per_key_and_per_tenant_hold_across_replicas(runtime, browser, connected_settings, upstream,
                                                                      redis_url, tmp_path):
    await connected_tenant(runtime, browser, "limited")
    first, second = [await make_api_key(runtime, tenants=["limited"], name=n) for n in ("first", "second")]
    env = _env(connected_settings, redis_url, SMC_RATE_LIMIT_PER_KEY="100/minute", SMC_RATE_LIMIT_PER_TENANT="150/minute")
    with Fleet(env, tmp_path) as fleet:
        url = fleet.url(PROXY.format(slug="limited", path="teams"))
        by_first = _codes(await _gather_gets(url, first, 250))
        by_second = _codes(await _gather_gets(url, second, 250))
    print(f"\nrate limits across 3 replicas: key 100/min -> {by_first['200']} allowed; "
          f"tenant 150/min -> {by_first['200'] + by_second['200']} allowed")
    assert set(by_first) | set(by_second) <= {"200", "rate_limited"}
    assert by_first["200"] == pytest.approx(100, rel=0.02)  # the key's limit, for the fleet
    assert by_first["200"] + by_second["200"] == pytest.approx(150, rel=0.02)  # the tenant's, whichever key


async def test_the_salesmsg_budget_holds_across_replicas(runtime, browser, connected_settings, upstream, redis_url, tmp_path):
    await connected_tenant(runtime, browser, "budget-fleet")
    key = await make_api_key(runtime, tenants=["budget-fleet"])
    upstream.controls.reset()  # the connect's profile calls do not count for the test's minute
    upstream.controls.update_settings(rate_limit_per_minute=30)
    env = _env(connected_settings, redis_url, SMC_UPSTREAM_BUDGET_PER_MINUTE="30", SMC_UPSTREAM_BUDGET_BURST="30",
               SMC_UPSTREAM_BUDGET_MAX_WAIT_SECONDS="0")
    with Fleet(env, tmp_path) as fleet:
        codes = _codes(await _gather_gets(fleet.url(PROXY.format(slug="budget-fleet", path="teams")), key, 100))
    counters = upstream.controls.counters()
    served = sum(v for k, v in counters.items() if k.endswith(".served"))
    print(f"\nbudget 30/min across 3 replicas: {dict(codes)}; Salesmsg served {served}, "
          f"its 429s {counters.get('rate_limited', 0)}")
    assert codes == Counter({"200": 30, "upstream_budget_exhausted": 70})
    assert served == 30 and counters.get("rate_limited", 0) == 0


async def test_a_stampede_over_the_replicas_refreshes_once(runtime, browser, connected_settings, upstream, redis_url, tmp_path):
    tenant = await connected_tenant(runtime, browser, "stampede-fleet")
    key = await make_api_key(runtime, tenants=["stampede-fleet"])
    with Fleet(_env(connected_settings, redis_url), tmp_path) as fleet:
        async with runtime.db.session() as session:
            await session.execute(update(Connection).where(Connection.tenant_id == tenant.id)
                                  .values(access_expires_at=datetime.now(UTC) - timedelta(minutes=1)))
        upstream.controls.expire_tokens(org_id=PLAIN_ORG)
        upstream.controls.slow_token(300)  # widen the window in which the others must wait
        upstream.controls.reset_counters()
        try:
            codes = _codes(await _gather_gets(fleet.url(PROXY.format(slug="stampede-fleet", path="teams")), key, 90,
                                              concurrency=90))
        finally:
            upstream.controls.slow_token(0)
    print(f"\nstampede of 90 over 3 replicas: {dict(codes)}, refreshes {upstream.controls.counter('token.refresh')}")
    assert codes == Counter({"200": 90})
    assert upstream.controls.counter("token.refresh") == 1 and upstream.controls.counter("grant.reuse_detected") == 0


async def _refused_within_the_bound(client: httpx.AsyncClient, url: str, key: str, *, since: float, status: int,
                                    code: str) -> None:
    """Every request sent from ``since`` (the change's answer: it committed before) + 100 ms on is
    refused; one sent sooner may still be answered from the replica's grant cache, never later."""
    while True:
        sent = time.monotonic()
        answer = await client.get(url, headers=auth(key))
        if answer.status_code != 200:
            assert answer.status_code == status and answer.json()["error"]["code"] == code, answer.text
            return
        assert sent < since + GRANT_BOUND, f"answered {sent - since:.3f} s after the change committed"


async def test_a_revocation_through_one_replica_holds_within_100_ms_on_every_other(
    runtime, browser, connected_settings, upstream, redis_url, tmp_path
):
    await connected_tenant(runtime, browser, "revoked", hipaa=True, baa=True)
    key = await make_api_key(runtime, tenants=["revoked"])
    spare = await make_api_key(runtime, tenants=["revoked"], name="spare")
    operator_key = await make_api_key(runtime, operator=True, name="ops")
    await make_user(runtime, "ops@example.com")
    phi = PROXY.format(slug="revoked", path="conversations?limit=1")
    with Fleet(_env(connected_settings, redis_url), tmp_path) as fleet:
        others = (1, 2)
        async with httpx.AsyncClient(timeout=30) as client:
            for i in others:
                assert (await client.get(fleet.replica_url(i, phi), headers=auth(key))).status_code == 200

            # the BAA, revoked through the management API of replica 0
            answer = await client.post(fleet.replica_url(0, "/api/v1/tenants/revoked/baa/revoke"), headers=auth(operator_key),
                                       json={"reason": "fleet test"})
            assert answer.status_code == 200, answer.text
            since = time.monotonic()
            for i in others:
                await _refused_within_the_bound(client, fleet.replica_url(i, phi), key, since=since, status=403,
                                                code="baa_required")

            # an API key, revoked through replica 0's pages by a signed-in operator
            teams = PROXY.format(slug="revoked", path="teams")
            assert (await client.get(fleet.replica_url(1, teams), headers=auth(spare))).status_code == 200
            await _revoke_in_the_browser(client, fleet.replica_url(0, ""), spare, runtime)
            since = time.monotonic()
            for i in others:
                await _refused_within_the_bound(client, fleet.replica_url(i, teams), spare, since=since, status=401,
                                                code="invalid_api_key")

            # the connection, disconnected through replica 0
            answer = await client.delete(fleet.replica_url(0, "/api/v1/tenants/revoked/connection"), headers=auth(operator_key))
            assert answer.status_code == 200, answer.text
            since = time.monotonic()
            for i in others:
                await _refused_within_the_bound(client, fleet.replica_url(i, teams), key, since=since, status=409,
                                                code="not_connected")


async def _revoke_in_the_browser(client: httpx.AsyncClient, base: str, key: str, runtime) -> None:
    async with runtime.db.session() as session:
        key_id = (await session.scalars(select(ApiKey.id).where(ApiKey.prefix == api_keys.parse(key)))).one()
    async with httpx.AsyncClient(base_url=base, timeout=30) as browser:
        page = await browser.get("/login")
        signed_in = await browser.post("/login", data={"csrf_token": csrf_of(page.text), "email": "ops@example.com",
                                                       "password": PASSWORD})
        assert signed_in.status_code == 303, signed_in.text
        page = await browser.get("/api-keys")
        revoked = await browser.post(f"/api-keys/{key_id}/revoke", data={"csrf_token": csrf_of(page.text)})
        assert revoked.status_code == 303, revoked.text


async def test_a_replica_killed_under_load_loses_no_accepted_send_and_sends_none_twice(
    runtime, browser, connected_settings, upstream, redis_url, tmp_path
):
    await connected_tenant(runtime, browser, "killed")
    key = await make_api_key(runtime, tenants=["killed"])
    run = uuid.uuid4().hex[:6]
    outcomes: dict[str, list[int]] = {}  # message text -> every status its sends got
    with Fleet(_env(connected_settings, redis_url), tmp_path) as fleet:
        async with httpx.AsyncClient(timeout=30) as client:
            listing = await client.get(fleet.url(PROXY.format(slug="killed", path="conversations?limit=1")), headers=auth(key))
            conversation = listing.json()[0]["id"]
        send_url = fleet.url(PROXY.format(slug="killed", path=f"conversations/{conversation}/send"))
        stop = asyncio.Event()

        async def sender(n: int) -> None:
            async with httpx.AsyncClient(timeout=20) as client:
                i = 0
                while not stop.is_set():
                    text, i = f"fleet {run} {n}-{i}", i + 1
                    headers = {**auth(key), "Idempotency-Key": f"{run}-{n}-{i}"}
                    statuses = outcomes.setdefault(text, [])
                    for _ in range(4):  # as a client does: retry the same key until an answer says what happened
                        try:
                            status = (await client.post(send_url, headers=headers, json={"message": text})).status_code
                        except httpx.HTTPError:
                            status = 0
                        statuses.append(status)
                        if status < 500 and status not in (0, 409):
                            break
                        await asyncio.sleep(0.2)

        senders = [asyncio.create_task(sender(n)) for n in range(6)]
        await _until(lambda: sum(map(len, outcomes.values())) >= 30)
        fleet.kill(1)  # SIGKILL, mid-request
        killed_at = sum(map(len, outcomes.values()))
        await _until(lambda: sum(map(len, outcomes.values())) >= killed_at + 30)
        after_kill = [s for statuses in outcomes.values() for s in statuses][killed_at:]
        assert sum(200 <= s < 300 for s in after_kill) >= 20  # nginx routes around the dead replica
        fleet.restart(1)
        restarted_log = len(fleet.members[1].log())
        served_a_send = re.compile(r'"path": "[^"]*/send".*"status": 201|"status": 201.*"path": "[^"]*/send"')
        await _until(lambda: served_a_send.search(fleet.members[1].log()[restarted_log:]) is not None)  # it gets work again
        stop.set()
        await asyncio.gather(*senders)
        thread = await _whole_thread(fleet, key, conversation)
    bodies = Counter(m["body"] for m in thread if str(m.get("body", "")).startswith(f"fleet {run}"))
    accepted = {text for text, statuses in outcomes.items() if any(200 <= s < 300 for s in statuses)}
    unknown = set(outcomes) - accepted
    print(f"\nkill one of 3 replicas under load: {len(outcomes)} sends, {len(accepted)} accepted, "
          f"{len(unknown)} without a known outcome, statuses {Counter(s for st in outcomes.values() for s in st)}")
    assert accepted and all(bodies[text] == 1 for text in accepted)  # no accepted send lost
    assert all(count == 1 for count in bodies.values())  # none sent twice
    assert set(bodies) <= set(outcomes)
    refused = {text for text in unknown if outcomes[text] and 400 <= outcomes[text][-1] < 500 and outcomes[text][-1] != 409}
    assert not refused & set(bodies)  # a send refused for good was not sent


async def _whole_thread(fleet: Fleet, key: str, conversation: int) -> list[dict]:
    """Every message of the conversation, newest first, a hundred at a time (Salesmsg's cursor)."""
    messages: list[dict] = []
    before = ""
    async with httpx.AsyncClient(timeout=30) as client:
        while True:
            url = fleet.url(PROXY.format(slug="killed", path=f"messages/{conversation}?limit=100{before}"))
            page = await client.get(url, headers=auth(key))
            assert page.status_code == 200, page.text
            messages += page.json()
            if len(page.json()) < 100:
                return messages
            before = f"&before_id={page.json()[-1]['id']}"


async def _until(condition, *, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.05)
