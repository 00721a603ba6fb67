"""With ``SMC_REDIS_URL`` set and Redis stopped, the proxy keeps serving: rate limits fall back to
each process (logged), Salesmsg budgets to the database, and Redis is used again once it answers."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

from app.core.settings import Settings
from tests.support.journeys import auth, connected_tenant, make_api_key
from tests.support.tcp_proxy import free_port


class PrivateRedis:
    """A redis-server of the test's own on a free port, so stopping it touches nothing else."""

    def __init__(self, tmp_path) -> None:
        self.port = free_port()
        self.dir = tmp_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is missing (Debian: apt-get install -y redis-server)"
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                      "--dir", str(self.dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=1).ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def keys(self) -> list[bytes]:
        return redis.Redis(port=self.port, socket_connect_timeout=1).keys("*")


@pytest.fixture
def private_redis(tmp_path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def connected_settings(connected_settings: Settings, private_redis: PrivateRedis) -> Settings:
    return connected_settings.model_copy(update={"redis_url": private_redis.url, "rate_limit_per_key": "5/minute",
                                                 "upstream_budget_per_minute": 100})


async def test_with_redis_stopped_limits_fall_back_to_the_process_and_budgets_to_the_database(
    runtime, browser, client_for, upstream, private_redis
):
    await connected_tenant(runtime, browser, "outage")
    key = await make_api_key(runtime, tenants=["outage"])
    url = "/api/v1/tenants/outage/proxy/teams"
    shared = [(await client_for.get(url, headers=auth(key))).status_code for _ in range(6)]
    assert shared == [200] * 5 + [429]  # the key's limit, held in Redis
    assert any(k.startswith(b"smc:budget:") for k in private_redis.keys())

    private_redis.stop()
    alone = [await client_for.get(url, headers=auth(key)) for _ in range(7)]
    # served, not failed: the process's own limits (which know nothing of Redis's count) and the
    # budget in the database; the limit still holds
    assert [a.status_code for a in alone] == [200] * 5 + [429] * 2, [a.text for a in alone]
    assert {a.json()["error"]["code"] for a in alone[5:]} == {"rate_limited"}
    assert runtime.rate_limits.redis_down_until > 0
    budgets = runtime.upstream.budget.store
    assert budgets.down_until > 0
    view = await _view(runtime, "outage")
    # the five calls that went while Redis was away are in the database's ledger
    assert (await budgets.fallback.read(runtime.upstream.budget.key_for(view))).used(time.time(), 61.0) == 5

    private_redis.start()  # back, empty: once its retry time has come, Redis holds the limits and budgets again
    fresh = await make_api_key(runtime, tenants=["outage"], name="after")  # the process's own count refuses `key`
    deadline = time.monotonic() + 30
    while not any(k.startswith(b"smc:budget:") for k in private_redis.keys()):
        assert time.monotonic() < deadline, "the budget did not return to Redis"
        await client_for.get(url, headers=auth(fresh))
        await asyncio.sleep(0.25)
    assert budgets.down_until == 0 and runtime.rate_limits.redis_down_until == 0


async def _view(runtime, slug: str):
    from app.connections.store import get_connection
    from app.connections.view import ConnectionView
    from app.tenants import registry

    async with runtime.db.session() as session:
        tenant = await registry.get_tenant(session, slug)
        return ConnectionView.of(await get_connection(session, tenant.id))
