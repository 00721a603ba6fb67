"""Test databases: PostgreSQL when SMC_TEST_DATABASE_URL is set, a SQLite file otherwise.

PostgreSQL: one database per test run, created beside the one the URL names, migrated to head
once, emptied after each test (TRUNCATE; the audit log's append-only triggers are bypassed with
session_replication_role, which needs the superuser the test server has). SQLite: a migrated
template file copied fresh for each test.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import threading
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

from app.core.migrate import upgrade
from app.core.models import Base


def test_server_url() -> str | None:
    raw = os.environ.get("SMC_TEST_DATABASE_URL", "").strip()
    if not raw:
        return None
    if raw.startswith("postgres://") or raw.startswith("postgresql://"):
        raw = "postgresql+asyncpg://" + raw.split("://", 1)[1]
    return raw


def _asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def run_in_thread(fn, *args):
    """Run blocking code that may call asyncio.run() (Alembic's env does) off the test loop."""
    result: dict[str, object] = {}

    def target() -> None:
        try:
            result["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result.get("value")


class PostgresTestDatabase:
    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.name = f"smc_test_{secrets.token_hex(4)}"
        self.url = make_url(server_url).set(database=self.name).render_as_string(hide_password=False)

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(_asyncpg_dsn(self.server_url))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def create(self) -> None:
        asyncio.run(self._admin(f'CREATE DATABASE "{self.name}"'))
        upgrade(self.url)

    def drop(self) -> None:
        asyncio.run(self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))

    async def empty(self) -> None:
        tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
        conn = await asyncpg.connect(_asyncpg_dsn(self.url))
        try:
            await conn.execute(
                "SET session_replication_role = replica; "
                f"TRUNCATE {tables} RESTART IDENTITY CASCADE; "
                "SET session_replication_role = origin"
            )
        finally:
            await conn.close()


class SqliteTestDatabase:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.template = folder / "template.db"
        self.count = 0

    def create(self) -> None:
        upgrade(f"sqlite+aiosqlite:///{self.template}")

    def fresh_url(self) -> str:
        self.count += 1
        path = self.folder / f"test-{self.count}.db"
        shutil.copyfile(self.template, path)
        return f"sqlite+aiosqlite:///{path}"
