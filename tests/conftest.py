"""Shared fixtures: a real database migrated to head, the app over ASGI, the emulator over HTTP.

App-level tests run against a real engine with real concurrency (single-flight refresh, leases,
idempotency and background writers need separate connections), so isolation comes from emptying
the database after each test. Service-level tests that need no concurrency can use
``db_session``: one connection inside a transaction that is rolled back.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from app.core.settings import Settings
from app.main import create_app
from tests.support.databases import (
    PostgresTestDatabase,
    SqliteTestDatabase,
    run_in_thread,
    test_server_url,
)


@pytest.fixture(scope="session")
def test_database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresTestDatabase | SqliteTestDatabase]:
    server = test_server_url()
    database: PostgresTestDatabase | SqliteTestDatabase
    if server:
        database = PostgresTestDatabase(server)
        run_in_thread(database.create)
        yield database
        run_in_thread(database.drop)
    else:
        database = SqliteTestDatabase(tmp_path_factory.mktemp("db"))
        run_in_thread(database.create)
        yield database


@pytest.fixture
def on_postgres(test_database) -> bool:
    return isinstance(test_database, PostgresTestDatabase)


@pytest.fixture
def requires_postgres(on_postgres: bool) -> None:
    if not on_postgres:
        pytest.skip("needs PostgreSQL: set SMC_TEST_DATABASE_URL (runs in .ci/run)")


@pytest.fixture
def redis_url() -> str:
    """A Redis database for the tests that share state through it (``SMC_TEST_REDIS_URL``; .ci/run
    starts the machine's Redis). Without the variable, the local default is tried and the test is
    skipped with the reason if nothing answers there."""
    import redis

    url = os.environ.get("SMC_TEST_REDIS_URL")
    try:
        client = redis.Redis.from_url(url or "redis://127.0.0.1:6379/15", socket_connect_timeout=2)
        client.flushdb()
        client.close()
    except redis.RedisError:
        if url:
            raise
        pytest.skip("needs Redis: set SMC_TEST_REDIS_URL (runs in .ci/run)")
    return url or "redis://127.0.0.1:6379/15"


@pytest.fixture
async def database_url(test_database) -> AsyncIterator[str]:
    if isinstance(test_database, PostgresTestDatabase):
        yield test_database.url
        await test_database.empty()
    else:
        yield test_database.fresh_url()


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(
        _env_file=None,
        env="development",
        database_url=database_url,
        public_url="http://127.0.0.1:8000",
        salesmsg_api_base="http://127.0.0.1:9/pub/v2.2",
        salesmsg_authorize_url="http://127.0.0.1:9/auth/oauth",
        # every call still goes through Salesmsg's budget (its ledger, its store); the limit binds
        # only in the tests that set it (tests/proxy/test_budget*.py)
        upstream_budget_per_minute=1_000_000,
    )


@pytest.fixture
async def app(settings: Settings):
    application = create_app(settings, configure_logs=False)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
        yield http


@pytest.fixture(scope="session")
def emulator():
    """One emulator per test run, on a loopback port; tests reset it to its seed (``upstream``)."""
    from tests.support.emulator_controls import ControlledEmulator
    from tests.support.journeys import emulator_config

    with ControlledEmulator(emulator_config()) as server:
        yield server


@pytest.fixture
def upstream(emulator):
    """The emulator, back at its seed state with no faults and a BAA-less client."""
    emulator.controls.reset_state()
    return emulator


@pytest.fixture
def connected_settings(settings: Settings, upstream) -> Settings:
    """Settings whose Salesmsg is the emulator."""
    from tests.support.journeys import CLIENT_ID, CLIENT_SECRET

    return settings.model_copy(
        update={
            "salesmsg_api_base": upstream.api_base,
            "salesmsg_authorize_url": upstream.authorize_url,
            "salesmsg_client_id": CLIENT_ID,
            "salesmsg_client_secret": CLIENT_SECRET,
        }
    )


@pytest.fixture
async def live_app(connected_settings: Settings):
    """The app wired to the emulator, lifespan running."""
    application = create_app(connected_settings, configure_logs=False)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
def runtime(live_app):
    return live_app.state.runtime


@pytest.fixture
async def client_for(live_app):
    """An API client (no cookies) for the app wired to the emulator."""
    transport = httpx.ASGITransport(app=live_app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
        yield http


@pytest.fixture
async def browser(live_app, upstream):
    from tests.support.journeys import Browser

    b = Browser(live_app, upstream.url)
    yield b
    await b.close()


@pytest.fixture
async def db_session(database_url: str) -> AsyncIterator[AsyncSession]:
    """A session inside a transaction that is rolled back after the test."""
    engine = create_async_engine(database_url)
    async with engine.connect() as conn:
        transaction = await conn.begin()
        maker = async_sessionmaker(
            bind=conn,
            expire_on_commit=False,
            join_transaction_mode="create_savepoint",
            info={"sqlite_audit_lock": asyncio.Lock()},
        )
        async with maker() as session:
            yield session
        await transaction.rollback()
    await engine.dispose()
