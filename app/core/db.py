"""The database: one async engine per process, PostgreSQL (asyncpg) or SQLite (aiosqlite)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from app.core.settings import Settings

# execution option of a write that cannot change a proxy grant (app.proxy.grant_cache): the key usage
# recorder's last_used_at; every other write to a grant's tables empties this process's grant cache
GRANTS_UNAFFECTED = "smc_grants_unaffected"


def create_engine(settings: Settings) -> AsyncEngine:
    """Build the engine for ``SMC_DATABASE_URL``; SQLite gets WAL, foreign keys and a busy timeout."""
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": 30}, hide_parameters=True)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_async_engine(
        url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_pool_size,
        pool_recycle=1800,
        pool_timeout=10,
        # an error names the statement, never its parameters (they can hold personal data)
        hide_parameters=True,
        # No pre-ping: it would cost the proxy a round trip per request. A dropped
        # connection invalidates the pool on first use, and the next request reconnects.
        connect_args={"server_settings": {"application_name": "salesmsg-connect"}},
    )


class Database:
    """The engine and the session factory the app uses; built once by the lifespan."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        # SQLite serves one process; this lock serializes audit-chain appends there
        # (PostgreSQL uses an advisory lock instead, see app.audit).
        self.audit_lock = asyncio.Lock()
        self.sessionmaker = async_sessionmaker(
            engine, expire_on_commit=False, autoflush=False, info={"sqlite_audit_lock": self.audit_lock}
        )

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A unit of work: commits when the block ends cleanly, rolls back otherwise."""
        async with self.sessionmaker() as session:
            try:
                yield session
                await session.commit()
            except BaseException:
                await session.rollback()
                raise

    async def dispose(self) -> None:
        await self.engine.dispose()
