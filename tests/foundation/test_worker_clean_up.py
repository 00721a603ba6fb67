"""The worker's clean-up drops rows that have served their time, and only those."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from app.core.models import IdempotencyRecord, LoginAttempt, OAuthState, WebSession
from tests.support.journeys import make_tenant


async def test_clean_up_drops_expired_states_sessions_answers_and_old_sign_in_attempts(app):
    runtime = app.state.runtime
    tenant = await make_tenant(runtime, "tidy")
    now = datetime.now(UTC)
    async with runtime.db.session() as session:
        for name, expires in (("live", now + timedelta(hours=1)), ("expired", now - timedelta(seconds=1))):
            session.add(WebSession(id=name, csrf_token="x", created_at=now - timedelta(hours=13), last_seen_at=now,
                                   expires_at=expires))
        await session.flush()
        for name, expires in (("recent", now - timedelta(minutes=5)), ("stale", now - timedelta(days=2))):
            session.add(OAuthState(id=uuid.uuid4(), state_hash=name, session_id="live", tenant_id=tenant.id, scopes="teams:read",
                                   created_by="test", expires_at=expires))
        for name, expires in (("kept", now + timedelta(hours=1)), ("gone", now - timedelta(seconds=1))):
            session.add(IdempotencyRecord(tenant_id=tenant.id, key=name, fingerprint="f", state="completed", created_at=now,
                                          expires_at=expires))
        for email, at in (("new@example.com", now - timedelta(hours=1)), ("old@example.com", now - timedelta(days=3))):
            session.add(LoginAttempt(email=email, ip="127.0.0.1", succeeded=False, at=at))

    await runtime.new_worker().clean_up()

    async with runtime.db.session() as session:
        assert set((await session.scalars(select(WebSession.id))).all()) == {"live"}
        assert set((await session.scalars(select(OAuthState.state_hash))).all()) == {"recent"}
        assert set((await session.scalars(select(IdempotencyRecord.key))).all()) == {"kept"}
        assert set((await session.scalars(select(LoginAttempt.email))).all()) == {"new@example.com"}
