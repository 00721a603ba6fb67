"""Migrations are the only way the schema is made; the models must agree with them."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from app.core.migrate import downgrade, upgrade
from app.core.models import Base
from tests.support.databases import run_in_thread


async def _diff(url: str) -> list:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(sync, opts={"compare_type": True, "compare_server_default": True}),
                    Base.metadata,
                )
            )
    finally:
        await engine.dispose()


async def test_models_and_migrations_agree(database_url):
    assert await _diff(database_url) == []


@pytest.mark.usefixtures("requires_postgres")
async def test_upgrade_downgrade_upgrade_on_postgres(database_url):
    run_in_thread(downgrade, database_url, "base")
    run_in_thread(upgrade, database_url, "head")
    assert await _diff(database_url) == []


async def test_audit_log_is_append_only_in_the_database(database_url):
    from datetime import UTC, datetime

    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO audit_log (at, actor_type, action, outcome, details, prev_hash, hash) "
                    "VALUES (:at, 'system', 'test', 'success', '{}', :p, :h)"
                ),
                {"at": datetime.now(UTC).replace(tzinfo=None), "p": "0" * 64, "h": "1" * 64},
            )
        for statement in ("UPDATE audit_log SET action = 'forged'", "DELETE FROM audit_log"):
            with pytest.raises(DBAPIError, match="append-only"):
                async with engine.begin() as conn:
                    await conn.execute(text(statement))
    finally:
        await engine.dispose()
