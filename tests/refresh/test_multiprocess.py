"""Exactly one refresh per connection across real processes (PostgreSQL: leases and SKIP LOCKED)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import func, select, update

from app.audit.audit_log import Actor
from app.connections import store, transitions
from app.core.models import Connection
from app.tenants import registry
from app.vault import tenant_keys
from tests.reliability.support import serve_env
from tests.support.journeys import connected_tenant, make_api_key
from tests.support.processes import Served
from tests.support.tcp_proxy import free_port

pytestmark = pytest.mark.usefixtures("requires_postgres")


async def test_100_callers_across_4_processes_refresh_an_expired_token_once(
    runtime, browser, connected_settings, upstream, tmp_path
):
    tenant = await connected_tenant(runtime, browser, "stampede")
    key = await make_api_key(runtime, tenants=["stampede"])
    async with runtime.db.session() as session:
        await session.execute(
            update(Connection).where(Connection.tenant_id == tenant.id).values(access_expires_at=datetime.now(UTC) - timedelta(minutes=1))
        )
    upstream.controls.expire_tokens(org_id=3)
    upstream.controls.slow_token(300)  # widen the window in which the others must wait
    upstream.controls.reset_counters()
    env = serve_env(connected_settings)
    ports = [free_port() for _ in range(4)]
    servers = [Served("serve", "--port", str(p), env=env, log_path=tmp_path / f"serve-{p}.log") for p in ports]
    try:
        for server, port in zip(servers, ports):
            server.wait_for(f"http://127.0.0.1:{port}/healthz")
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)) as client:
            calls = [
                client.get(f"http://127.0.0.1:{ports[i % 4]}/api/v1/tenants/stampede/proxy/conversations?limit=2",
                           headers={"Authorization": f"Bearer {key}"})
                for i in range(100)
            ]
            responses = await asyncio.gather(*calls)
    finally:
        for server in servers:
            server.stop()
        upstream.controls.slow_token(0)
    assert [r.status_code for r in responses] == [200] * 100, {r.status_code for r in responses}
    assert upstream.controls.counter("token.refresh") == 1
    assert upstream.controls.counter("grant.reuse_detected") == 0
    async with runtime.db.session() as session:
        conn = await store.get_connection(session, tenant.id)
        key_ = await tenant_keys.load_data_key(session, runtime.data_keys, tenant.id)
    assert conn.version == 2 and conn.lease_owner is None
    # the database holds the rotated refresh token: refreshing with it works (a stale one would kill the grant)
    refreshed = await runtime.refresher.force_refresh(conn.id, seen_version=conn.version)
    assert refreshed.version == 3 and upstream.controls.counter("token.refresh.200") == 2
    assert store.open_refresh_token(conn, key_)


async def _make_pat_connections(runtime, upstream, count: int) -> None:
    pats = [upstream.controls.issue_pat(301, "conversations:read teams:read") for _ in range(count)]
    soon = datetime.now(UTC) + timedelta(seconds=60)
    async with runtime.db.session() as session:
        for i, pat in enumerate(pats):
            tenant = await registry.create_tenant(session, keyring=runtime.keyring, slug=f"bulk-{i:04d}", name=f"Bulk {i}",
                                                 hipaa=False, actor=Actor.system())
            key = await tenant_keys.data_key_for(session, runtime.data_keys, tenant.id)
            conn, _ = await transitions.connected(
                session, tenant=tenant, key=key, kind="pat", access_token=pat, refresh_token=None, expires_in=None,
                granted_scopes=["conversations:read", "teams:read"], actor=Actor.system(),
            )
            conn.access_expires_at = soon


async def test_two_workers_sweeping_500_due_connections_refresh_each_once(runtime, connected_settings, upstream, tmp_path):
    await _make_pat_connections(runtime, upstream, 500)
    upstream.controls.reset_counters()
    env = serve_env(connected_settings, SMC_WORKER_INTERVAL_SECONDS="0.2", SMC_WORKER_BATCH_SIZE="40", SMC_WORKER_CONCURRENCY="8")
    workers = [Served("worker", env=env, log_path=tmp_path / f"worker-{i}.log") for i in range(2)]
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            async with runtime.db.session() as session:
                done = await session.scalar(select(func.count()).select_from(Connection).where(Connection.version >= 2))
            if done == 500:
                break
            await asyncio.sleep(0.3)
        await asyncio.sleep(1.0)  # a double refresh, if any, would land now
    finally:
        for worker in workers:
            worker.stop()
    logs = [w.log_path.read_text() for w in workers]
    per_worker = [log.count('"token refreshed"') for log in logs]
    async with runtime.db.session() as session:
        versions = (await session.scalars(select(Connection.version))).all()
        statuses = set((await session.scalars(select(Connection.status))).all())
    assert sorted(set(versions)) == [2], f"versions {sorted(set(versions))}"
    assert statuses == {"active"}
    assert upstream.controls.counter("token.pat_refresh") == 500
    assert upstream.controls.counter("token.pat_refresh.200") == 500
    assert sum(per_worker) == 500, per_worker
    print(f"refreshes per worker: {per_worker}")
