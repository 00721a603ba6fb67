"""The small helpers every domain shares: token hashes, backoff, spending a single-use row."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from app.core.models import ConnectLink, Tenant
from app.kit.backoff import jittered
from app.kit.single_use import spend
from app.kit.tokens import hash_matches, new_token, token_hash


def test_tokens_are_random_prefixed_and_stored_only_as_their_hash():
    first, second = new_token("smc_link_"), new_token("smc_link_")
    assert first.startswith("smc_link_") and first != second and len(first) > 40
    assert token_hash(first) != first and len(token_hash(first)) == 64
    assert hash_matches(token_hash(first), first) and not hash_matches(token_hash(first), second)


def test_backoff_doubles_within_its_jitter_and_stops_at_the_cap():
    for attempt, ceiling in ((1, 2.0), (2, 4.0), (3, 8.0), (10, 60.0)):
        waits = [jittered(attempt, base=2.0, cap=60.0) for _ in range(200)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert max(waits) - min(waits) > 0  # jittered, not fixed


async def test_a_single_use_row_is_spent_exactly_once(db_session):
    tenant = Tenant(id=uuid.uuid4(), slug="spend-once", name="Spend once")
    db_session.add(tenant)
    await db_session.flush()  # no ORM relationship orders the two inserts
    link = ConnectLink(token_hash=token_hash(new_token()), tenant_id=tenant.id, created_by="test",
                       expires_at=datetime.now(UTC) + timedelta(hours=1))
    db_session.add(link)
    await db_session.flush()
    assert await spend(db_session, ConnectLink.used_at, link.id) is True
    assert await spend(db_session, ConnectLink.used_at, link.id) is False
    await db_session.refresh(link)
    assert link.used_at is not None


async def test_concurrent_spends_let_one_through(settings):
    from app.core.db import Database, create_engine

    db = Database(create_engine(settings))
    try:
        async with db.session() as session:
            tenant = Tenant(id=uuid.uuid4(), slug="race", name="Race")
            session.add(tenant)
            await session.flush()
            link = ConnectLink(token_hash=token_hash(new_token()), tenant_id=tenant.id, created_by="test",
                               expires_at=datetime.now(UTC) + timedelta(hours=1))
            session.add(link)
            await session.flush()
            link_id = link.id

        async def attempt() -> bool:
            async with db.session() as session:
                return await spend(session, ConnectLink.used_at, link_id)

        results = await asyncio.gather(*(attempt() for _ in range(8)))
        assert results.count(True) == 1
    finally:
        await db.dispose()
