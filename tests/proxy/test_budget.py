"""Salesmsg's request budget through the proxy and the dashboard, against the emulator over HTTP:
our 429 past the budget without a call to Salesmsg, a Salesmsg 429 locking the org out, and the
ledger held atomically by each store (the database, Redis) under concurrent callers."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from app.connections.view import ConnectionView
from app.core.db import Database, create_engine
from app.core.settings import Settings
from app.proxy.budget import BudgetRules, BudgetUnavailable, Ledger, UpstreamBudget
from app.proxy.budget_stores import LocalBudgetStore, PostgresBudgetStore, RedisBudgetStore
from tests.support.journeys import auth, connected_tenant, make_api_key

T0 = 1_780_000_000.0


@pytest.fixture
def connected_settings(connected_settings: Settings) -> Settings:
    # five calls a minute, no queue: the sixth is ours to refuse
    return connected_settings.model_copy(update={"upstream_budget_per_minute": 5, "upstream_budget_max_wait_seconds": 0.0})


def _served(upstream) -> int:
    return sum(v for k, v in upstream.controls.counters().items() if k.startswith("org.") and k.endswith(".served"))


async def test_past_the_budget_the_proxy_answers_429_itself_and_salesmsg_sees_nothing(runtime, browser, client_for, upstream):
    await connected_tenant(runtime, browser, "budgeted")
    key = await make_api_key(runtime, tenants=["budgeted"])
    upstream.controls.reset_counters()
    url = "/api/v1/tenants/budgeted/proxy/teams"
    answers = [await client_for.get(url, headers=auth(key)) for _ in range(7)]
    assert [a.status_code for a in answers] == [200] * 5 + [429] * 2
    refused = answers[-1]
    assert refused.json()["error"]["code"] == "upstream_budget_exhausted"
    assert 45 <= int(refused.headers["Retry-After"]) <= 62  # when the first call leaves our 61 s window
    assert _served(upstream) == 5 and upstream.controls.counter("rate_limited") == 0
    # the dashboard draws on the same budget: its inbox is refused too, with the same clear message
    page = await browser.app_client.get("/t/budgeted/conversations")
    assert page.status_code == 200 and "request budget for this organization is used up" in page.text
    assert _served(upstream) == 5
    overview = await browser.app_client.get("/t/budgeted")
    assert "5 of 5 calls in the last minute" in overview.text  # the operator sees why


async def test_a_salesmsg_429_locks_the_org_out_and_nothing_more_is_sent(runtime, browser, client_for, upstream, connected_settings):
    runtime.upstream.budget.rules = BudgetRules.of(connected_settings.model_copy(update={"upstream_budget_per_minute": 100}))
    await connected_tenant(runtime, browser, "locked")
    key = await make_api_key(runtime, tenants=["locked"])
    upstream.controls.reset_counters()
    upstream.controls.update_settings(rate_limit_per_minute=3)  # Salesmsg's own limit is lower than ours
    url = "/api/v1/tenants/locked/proxy/teams"
    answers = [await client_for.get(url, headers=auth(key)) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[-1].headers["Retry-After"] == "60"  # Salesmsg sends none; its lockout is a minute
    assert upstream.controls.counter("rate_limited") == 1
    for _ in range(3):
        again = await client_for.get(url, headers=auth(key))
        assert again.status_code == 429 and again.json()["error"]["code"] == "upstream_locked_out"
        assert 55 <= int(again.headers["Retry-After"]) <= 60
    assert upstream.controls.counter("rate_limited") == 1 and _served(upstream) == 3  # we sent nothing more
    state = await runtime.upstream.budget.state((await _view(runtime, "locked")))
    assert state is not None and state.used == 4 and state.locked_for > 55  # four went; the fourth was refused
    overview = await browser.app_client.get("/t/locked")
    assert "locked out</span> by Salesmsg for" in overview.text


async def _view(runtime, slug: str):
    from app.connections.store import get_connection
    from app.connections.view import ConnectionView
    from app.tenants import registry

    async with runtime.db.session() as session:
        tenant = await registry.get_tenant(session, slug)
        return ConnectionView.of(await get_connection(session, tenant.id))


# -- the stores, each shared by many concurrent callers ------------------------------------------


RULES = BudgetRules(limit=20, window=61.0, max_wait=5.0, lockout=60.0, burst=20)


class Clock:
    """The time a store reads inside its lock, set by the test."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


async def _check_store(store, clock: Clock) -> None:
    key = f"tenant:{uuid.uuid4()}"
    verdicts = await asyncio.gather(*(store.take(key, rules=RULES, caller=f"c{i % 4}") for i in range(100)))
    granted = [v.at for v in verdicts if v.at is not None]
    assert len(granted) == RULES.limit  # every grant counted once, however the calls interleaved
    assert all(at == T0 for at in granted)
    ledger = await store.read(key)
    assert ledger.used(T0, RULES.window) == RULES.limit and ledger.locked_until == 0
    # near the end of the window, the next calls queue for the slots that free up, each caller its share
    clock.now = T0 + 58
    later = await asyncio.gather(*(store.take(key, rules=RULES, caller=c) for c in ["greedy"] * 6 + ["a", "b"]))
    assert all(v.at is None or T0 + 61 <= v.at <= T0 + 58 + RULES.max_wait for v in later)
    assert [v.at is not None for v in later[-2:]] == [True, True]  # newcomers find a place beside the greedy caller
    assert sum(v.at is not None for v in later[:6]) < 6 and "fair_share" in {v.reason for v in later[:6]}
    await store.lock(key, until=T0 + 120)
    clock.now = T0 + 100
    assert (await store.take(key, rules=RULES, caller="c0")).reason == "locked"
    assert (await store.read(key)).locked_until == T0 + 120


async def test_the_postgres_store_counts_each_grant_once_under_concurrent_callers(requires_postgres, database_url):
    db = Database(create_engine(Settings(_env_file=None, database_url=database_url)))
    try:
        clock = Clock()
        await _check_store(PostgresBudgetStore(db, clock=clock), clock)
        assert (await PostgresBudgetStore(db).read("tenant:never-used")) == Ledger()
    finally:
        await db.dispose()


class CountingWrites(PostgresBudgetStore):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.writes = 0

    async def _update(self, key, change):
        self.writes += 1
        return await super()._update(key, change)


async def test_concurrent_calls_of_one_process_share_a_ledger_write_and_each_counts_once(requires_postgres, database_url):
    """Group commit: a hundred calls arriving together cost the database a few transactions, not a
    hundred, and the ledger still grants exactly the limit, in arrival order (the first twenty)."""
    db = Database(create_engine(Settings(_env_file=None, database_url=database_url)))
    try:
        clock = Clock()
        store = CountingWrites(db, clock=clock)
        key = f"tenant:{uuid.uuid4()}"
        verdicts = await asyncio.gather(*(store.take(key, rules=RULES, caller=f"c{i}") for i in range(100)))
        assert [v.at is not None for v in verdicts] == [True] * RULES.limit + [False] * 80
        assert (await store.read(key)).used(T0, RULES.window) == RULES.limit
        assert store.writes <= 3
        # a call cancelled while it waits for its batch takes nothing from the budget
        clock.now = T0 + 200
        other = f"tenant:{uuid.uuid4()}"
        first = asyncio.ensure_future(store.take(other, rules=RULES, caller="a"))
        cancelled = asyncio.ensure_future(store.take(other, rules=RULES, caller="b"))
        await asyncio.sleep(0)
        cancelled.cancel()
        assert (await first).at is not None
        assert (await store.read(other)).used(clock.now, RULES.window) == 1
        assert not store._pending  # every batch writer ended
    finally:
        await db.dispose()


async def test_stores_of_several_processes_share_one_ledger_exactly(requires_postgres, database_url):
    """Three processes' stores (each its own engine and pool) writing one budget at once: exactly
    the limit goes through, and a lockout written by one refuses calls in every other."""
    dbs = [Database(create_engine(Settings(_env_file=None, database_url=database_url))) for _ in range(3)]
    try:
        clock = Clock()
        stores = [PostgresBudgetStore(db, clock=clock) for db in dbs]
        key = f"tenant:{uuid.uuid4()}"
        for store in stores:  # each process has used the ledger once
            assert (await store.take(key, rules=RULES, caller="warm")).at is not None
        verdicts = await asyncio.gather(*(stores[i % 3].take(key, rules=RULES, caller=f"c{i}") for i in range(90)))
        assert sum(v.at is not None for v in verdicts) == RULES.limit - 3
        assert (await stores[0].read(key)).used(T0, RULES.window) == RULES.limit
        await stores[1].lock(key, until=T0 + 120)  # a Salesmsg 429 seen by one process ...
        clock.now = T0 + 100
        for store in (stores[0], stores[2]):  # ... refuses every other
            assert (await store.take(key, rules=RULES, caller="late")).reason == "locked"
    finally:
        for db in dbs:
            await db.dispose()


async def test_a_database_that_cannot_be_reached_refuses_every_waiting_call_of_a_batch():
    """Nothing goes unbudgeted and nobody waits forever: each call of the batch gets the store's
    refusal, and the batch writer ends."""
    from tests.support.tcp_proxy import free_port

    url = f"postgresql+asyncpg://root@127.0.0.1:{free_port()}/nothing"
    db = Database(create_engine(Settings(_env_file=None, database_url=url)))
    try:
        store = PostgresBudgetStore(db, clock=Clock())
        key = f"tenant:{uuid.uuid4()}"
        outcomes = await asyncio.gather(*(store.take(key, rules=RULES, caller=f"c{i}") for i in range(5)),
                                        return_exceptions=True)
        assert all(isinstance(o, BudgetUnavailable) for o in outcomes), outcomes
        assert not store._pending
    finally:
        await db.dispose()


async def test_the_in_process_store_of_sqlite_deployments_keeps_the_same_ledger():
    clock = Clock()
    await _check_store(LocalBudgetStore(clock=clock), clock)


async def test_the_redis_store_counts_each_grant_once_under_concurrent_callers(redis_url):
    clock = Clock()
    store = RedisBudgetStore(redis_url, clock=clock)
    try:
        await _check_store(store, clock)
    finally:
        await store.close()


async def test_a_call_that_would_leave_after_its_slot_takes_another(connected_settings):
    """A slow store (or a busy process) must not send a call later than its slot allows: the
    window's guard covers half a second; past that the call takes a new slot."""

    class SlowCommit(LocalBudgetStore):
        slow = True

        async def take(self, key, *, rules, caller):
            verdict = await super().take(key, rules=rules, caller=caller)
            if self.slow:
                self.slow = False
                await asyncio.sleep(rules.lateness + 0.1)  # the answer comes back after the slot went by
            return verdict

    store = SlowCommit()
    budget = UpstreamBudget(settings=connected_settings.model_copy(update={"upstream_budget_per_minute": 60}), store=store)
    view = ConnectionView(id=uuid.uuid4(), tenant_id=uuid.uuid4(), kind="oauth", status="active", version=1, scopes="",
                          access_token_ct=None, access_expires_at=None)
    await budget.acquire(view, caller="key:slow")
    assert (await store.read(budget.key_for(view))).used(time.time(), budget.rules.window) == 2  # the missed slot counts


async def test_a_send_cancelled_while_it_waits_for_the_budget_frees_its_idempotency_key(runtime, browser, upstream):
    from app.proxy.idempotency import fingerprint
    from app.vault import tenant_keys

    tenant = await connected_tenant(runtime, browser, "queued-send")
    async with runtime.db.session() as session:
        key = await tenant_keys.load_data_key(session, runtime.data_keys, tenant.id)
    waiting = asyncio.Event()

    async def waits_in_the_queue():  # what Upstream.call does while the budget holds it: nothing sent yet
        waiting.set()
        await asyncio.Event().wait()

    fp = fingerprint("POST", "conversations/1/send", b"", b"{}")
    first = asyncio.create_task(runtime.idempotency.once(tenant_id=tenant.id, key="k1", fp=fp, data_key=key,
                                                        call=waits_in_the_queue))
    await waiting.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first

    async def sends():
        from app.proxy.upstream import Answer
        return Answer(201, [], b'{"id": 1}', True)

    answer, replayed = await runtime.idempotency.once(tenant_id=tenant.id, key="k1", fp=fp, data_key=key, call=sends)
    assert answer.status == 201 and not replayed  # the key was free: the retry sent, it did not wait for a 409


async def test_a_budget_store_that_cannot_be_reached_refuses_the_call_and_sends_nothing(connected_settings):
    """Fail closed: no call goes to Salesmsg unbudgeted (503 budget_unavailable, Retry-After)."""
    from app.core.errors import Refusal
    from app.proxy.budget import BudgetUnavailable

    class Unreachable(LocalBudgetStore):
        async def take(self, key, *, rules, caller):
            raise BudgetUnavailable("ConnectionRefusedError")

    budget = UpstreamBudget(settings=connected_settings.model_copy(update={"upstream_budget_per_minute": 60}),
                            store=Unreachable())
    view = ConnectionView(id=uuid.uuid4(), tenant_id=uuid.uuid4(), kind="oauth", status="active", version=1, scopes="",
                          access_token_ct=None, access_expires_at=None)
    with pytest.raises(Refusal) as refused:
        await budget.acquire(view, caller="key:any")
    assert refused.value.status_code == 503 and refused.value.code == "budget_unavailable"
    assert refused.value.headers["Retry-After"] == "5"
