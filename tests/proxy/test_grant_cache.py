"""The proxy's grant cache: what it stores, when it serves, and that it never serves a grant staler
than its bound (100 ms) whatever happens to its invalidation channel (PostgreSQL LISTEN/NOTIFY).

The channel tests run the cache, its channel and the lookup of this process against PostgreSQL,
the channel's connection through the suite's TCP fault proxy, so it can be cut loudly (reset) or
silently (a stall: open sockets, nothing delivered). Changes are written through the app's own
engine, which this separate cache does not watch: for it they come from another process.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime

import asyncpg
from sqlalchemy import select, update
from sqlalchemy.engine import make_url

from app.core.metrics import GRANT_CHANNEL_DOWN
from app.core.models import ApiKey, Connection, Tenant
from app.identity import api_keys
from app.proxy.grant_cache import BOUND_SECONDS, CHANNEL, GrantCache, GrantChannel, writes_watched
from app.proxy.grants import GrantLookup
from tests.reliability.support import apoll
from tests.support.journeys import auth, connected_tenant, make_api_key
from tests.support.tcp_proxy import TcpFaultProxy

# -- the rules, without a database ---------------------------------------------------------------


def test_the_statements_that_can_change_a_grant_are_recognised():
    assert writes_watched("UPDATE api_keys SET revoked_at=$1 WHERE api_keys.id = $2")
    assert writes_watched('DELETE FROM "tenants" WHERE tenants.id = $1')
    assert writes_watched("INSERT INTO connections (id, tenant_id) VALUES ($1, $2)")
    assert writes_watched("  update tenant_keys set wrapped_key=$1")
    assert writes_watched("TRUNCATE audit_log, api_key_tenants")
    assert not writes_watched("SELECT api_keys.id FROM api_keys")
    assert not writes_watched("UPDATE web_sessions SET last_seen_at=$1")
    assert not writes_watched("INSERT INTO audit_log (action) VALUES ($1)")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_cache_serves_only_within_its_bound_of_the_last_heartbeat():
    clock = Clock()
    cache = GrantCache(clock=clock, bound=0.1)
    cache.put("k", "grant", generation=cache.generation)
    assert cache.get("k") is None and not cache.entries  # never proved fresh: bypassed, nothing stored
    cache.confirmed(sent_at=100.0)
    cache.put("k", "grant", generation=cache.generation)
    assert cache.get("k") == "grant"
    clock.now = 100.0999
    assert cache.get("k") == "grant"
    clock.now = 100.1  # no heartbeat came back for 100 ms: a change may be on its way unseen
    assert cache.get("k") is None
    cache.confirmed(sent_at=100.05)
    assert cache.get("k") == "grant"


def test_a_lookup_that_straddles_an_invalidation_is_not_stored_and_a_local_write_bypasses():
    clock = Clock()
    cache = GrantCache(clock=clock)
    cache.confirmed(sent_at=clock.now)
    started = cache.generation
    cache.invalidate()  # a change was announced while the lookup read the database
    cache.put("k", "stale", generation=started)
    assert cache.get("k") is None
    cache.put("k", "fresh", generation=cache.generation)
    token = object()
    cache.writing.add(token)  # this process is writing a grant's table
    assert cache.get("k") is None
    cache.writing.discard(token)
    cache.channel_lost()
    assert cache.get("k") is None and not cache.entries


# -- PostgreSQL ------------------------------------------------------------------------------------


async def _listen(dsn_kwargs: dict) -> tuple[asyncpg.Connection, list[str]]:
    conn = await asyncpg.connect(**dsn_kwargs)
    seen: list[str] = []
    await conn.add_listener(CHANNEL, lambda *args: seen.append(args[-1]))
    await conn.add_listener("probe", lambda *args: seen.append("probe"))
    return conn, seen


def _connect_kwargs(database_url: str, *, port: int | None = None) -> dict:
    url = make_url(database_url)
    return {"host": url.host or "127.0.0.1", "port": port or url.port or 5432, "user": url.username,
            "password": url.password, "database": url.database}


async def test_the_triggers_announce_every_change_a_grant_reads_and_nothing_else(requires_postgres, runtime, database_url):
    """A probe sent after each change arrives after that change's notification (PostgreSQL delivers
    in commit order), so each check waits on a condition, never on time."""
    conn, seen = await _listen(_connect_kwargs(database_url))
    key = await make_api_key(runtime, name="probe")
    prefix = api_keys.parse(key)

    async def after(change) -> list[str]:
        seen.clear()
        async with runtime.db.session() as session:
            await change(session)
        async with runtime.db.engine.connect() as writer:
            await writer.exec_driver_sql("NOTIFY probe")
            await writer.commit()
        await apoll(lambda: _true(seen and seen[-1] == "probe"), interval=0.005, what="the probe")
        return seen[:-1]

    try:
        row = (await _scalar(runtime, select(ApiKey).where(ApiKey.prefix == prefix)))
        assert await after(lambda s: s.execute(update(ApiKey).where(ApiKey.id == row.id).values(
            last_used_at=datetime.now(UTC)))) == []  # the usage recorder's write changes no grant
        assert await after(lambda s: s.execute(update(ApiKey).where(ApiKey.id == row.id).values(
            revoked_at=datetime.now(UTC)))) == ["api_keys"]
        tenant_id = uuid.uuid4()
        assert await after(lambda s: s.execute(Tenant.__table__.insert().values(
            id=tenant_id, slug="probe-tenant", name="Probe", hipaa=True))) == ["tenants"]
        assert await after(lambda s: s.execute(update(Tenant).where(Tenant.id == tenant_id).values(
            baa_signed_at=datetime.now(UTC)))) == ["tenants"]
        assert await after(lambda s: s.execute(update(Tenant).where(Tenant.id == tenant_id).values(
            name="Renamed"))) == []
        conn_id = uuid.uuid4()
        assert await after(lambda s: s.execute(Connection.__table__.insert().values(
            id=conn_id, tenant_id=tenant_id, kind="oauth", status="active", scopes=""))) == ["connections"]
        assert await after(lambda s: s.execute(update(Connection).where(Connection.id == conn_id).values(
            lease_owner="worker-1"))) == []  # a refresh lease changes no grant ...
        assert await after(lambda s: s.execute(update(Connection).where(Connection.id == conn_id).values(
            version=Connection.version + 1, access_token_ct=b"new"))) == ["connections"]  # ... the refresh does
        assert await after(lambda s: s.execute(update(Connection).where(Connection.id == conn_id).values(
            status="disconnected"))) == ["connections"]
    finally:
        await conn.close()


async def _true(value) -> bool:
    return bool(value)


async def _scalar(runtime, statement):
    async with runtime.db.session() as session:
        return await session.scalar(statement)


async def _revoke(runtime, prefix: str) -> float:
    """Revoke the key through the app's engine; the time its transaction committed."""
    async with runtime.db.session() as session:
        await session.execute(update(ApiKey).where(ApiKey.prefix == prefix).values(revoked_at=datetime.now(UTC)))
    return time.monotonic()


async def test_the_channel_cut_silently_or_loudly_bypasses_the_cache(requires_postgres, runtime, browser, upstream,
                                                                      database_url):
    await connected_tenant(runtime, browser, "cut-channel")
    keys = [await make_api_key(runtime, tenants=["cut-channel"], name=f"k{i}") for i in range(4)]
    prefixes = [api_keys.parse(k) for k in keys]
    with TcpFaultProxy(_connect_kwargs(database_url)["host"], _connect_kwargs(database_url)["port"]) as link:
        cache = GrantCache()
        channel = GrantChannel(cache, connect_kwargs=_connect_kwargs(database_url, port=link.port))
        lookup = GrantLookup(runtime.db, cache=cache)
        channel.start()
        try:
            await apoll(lambda: _true(cache.serving()), interval=0.01, what="the channel's first heartbeat")
            for prefix in prefixes:
                assert (await lookup.find(prefix, "cut-channel")).revoked_at is None
            assert len(cache.entries) == 4
            hit = await lookup.find(prefixes[0], "cut-channel")
            assert hit is cache.entries[(prefixes[0], "cut-channel")]  # served from memory

            # 1. channel up: another process's revocation empties the cache when it is announced
            await _revoke(runtime, prefixes[0])
            await apoll(lambda: _true((prefixes[0], "cut-channel") not in cache.entries), interval=0.005,
                        what="the revocation's notification")
            assert (await lookup.find(prefixes[0], "cut-channel")).revoked_at is not None
            assert (await lookup.find(prefixes[1], "cut-channel")).revoked_at is None  # cached again

            # 2. a silent cut: nothing arrives, the sockets stay open. A revocation committed now is
            # not announced, yet from its commit + the bound on, every lookup reads the database.
            link.stalled = True
            committed = await _revoke(runtime, prefixes[1])
            await asyncio.sleep(max(0.0, committed + BOUND_SECONDS - time.monotonic()))  # the contract's bound
            assert (await lookup.find(prefixes[1], "cut-channel")).revoked_at is not None
            assert not cache.serving()
            await apoll(lambda: _true(not channel.connected.is_set()), interval=0.05, what="the channel to give up")

            # 3. back: the channel listens again on a new connection, empties what it held, serves again
            link.stalled = False
            await apoll(lambda: _true(cache.serving()), interval=0.01, timeout=30, what="the channel back")
            assert (await lookup.find(prefixes[2], "cut-channel")).revoked_at is None
            assert (prefixes[2], "cut-channel") in cache.entries

            # 4. a loud cut (the connection reset): bypassed at once, no bound to wait for
            link.down()
            await apoll(lambda: _true(not cache.serving()), interval=0.005, what="the cut to be seen")
            await _revoke(runtime, prefixes[2])
            assert (await lookup.find(prefixes[2], "cut-channel")).revoked_at is not None
            link.up()
            await apoll(lambda: _true(cache.serving()), interval=0.01, timeout=30, what="the channel back")
            assert (await lookup.find(prefixes[3], "cut-channel")).revoked_at is None
        finally:
            await channel.stop()


async def test_without_its_triggers_the_channel_never_lets_the_cache_serve(requires_postgres, runtime, database_url):
    """A database behind migration 0004, or with its triggers disabled (a restore), announces no
    change: the channel counts as down and the cache stays bypassed until the triggers are there."""
    await make_api_key(runtime, name="probe")  # the app's schema is in place
    admin = await asyncpg.connect(**_connect_kwargs(database_url))
    cache = GrantCache()
    channel = GrantChannel(cache, connect_kwargs=_connect_kwargs(database_url))
    try:
        await admin.execute("ALTER TABLE tenants DISABLE TRIGGER smc_grants_changed")
        channel.start()
        for _ in range(3):  # three attempts to listen, each refused
            await apoll(lambda: _true(channel.failures >= 1), interval=0.01, what="an attempt")
            await asyncio.sleep(channel.heartbeat)
            assert not cache.serving() and not channel.connected.is_set()
        assert GRANT_CHANNEL_DOWN._value.get() == 1
        await admin.execute("ALTER TABLE tenants ENABLE TRIGGER smc_grants_changed")
        await apoll(lambda: _true(cache.serving()), interval=0.01, timeout=30, what="the channel with its triggers")
        assert GRANT_CHANNEL_DOWN._value.get() == 0
    finally:
        await admin.execute("ALTER TABLE tenants ENABLE TRIGGER smc_grants_changed")
        await admin.close()
        await channel.stop()


async def test_this_process_sees_its_own_changes_at_once(requires_postgres, runtime, browser, client_for, upstream):
    """The app's own cache: a call right after a change made in the same process reads it."""
    cache = runtime.proxy.grants.cache
    assert cache is not None
    await apoll(lambda: _true(cache.serving()), interval=0.01, what="the app's channel")
    await connected_tenant(runtime, browser, "own-change", hipaa=True, baa=True)
    operator = await make_api_key(runtime, operator=True, name="ops")
    key = await make_api_key(runtime, tenants=["own-change"])
    url = "/api/v1/tenants/own-change/proxy/conversations?limit=1"
    for _ in range(2):
        assert (await client_for.get(url, headers=auth(key))).status_code == 200
    assert (api_keys.parse(key), "own-change") in cache.entries
    # withhold the channel's announcements from this cache: only its own engine hook can empty it now
    channel = runtime.grant_channel
    assert channel is not None and channel.connection is not None
    await channel.connection.remove_listener(CHANNEL, channel._notified)
    revoked = await client_for.post("/api/v1/tenants/own-change/baa/revoke", headers=auth(operator),
                                    json={"reason": "test"})
    assert revoked.status_code == 200, revoked.text
    refused = await client_for.get(url, headers=auth(key))  # no wait for any notification
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "baa_required", refused.text
    await _revoke(runtime, api_keys.parse(key))
    assert (await client_for.get("/api/v1/tenants/own-change/proxy/teams", headers=auth(key))).status_code == 401



async def test_only_a_serving_process_listens_for_grant_changes(requires_postgres, runtime, connected_settings):
    """The app's lifespan listens; the worker and the command line (which serve no proxied call)
    hold no cache and no listening connection."""
    from app.runtime import Runtime

    assert runtime.grant_channel is not None and runtime.proxy.grants.cache is not None
    other = await Runtime.start(connected_settings)
    try:
        assert other.grant_channel is None and other.proxy.grants.cache is None
    finally:
        await other.stop()
