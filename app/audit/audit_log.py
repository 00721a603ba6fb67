"""The audit log: append-only, each row chained to the one before by SHA-256.

Rows are written in the same transaction as the change they record, so a change and its audit
row land together or not at all. The chain is serialized across processes with a PostgreSQL
advisory lock held to the end of the transaction (SQLite, one process, uses a process lock).
Never put a token, a secret or a message body into ``details``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import event, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from app.core.models import AuditEntry

GENESIS = "0" * 64
_ADVISORY_LOCK_ID = 0x534D43_0001  # "SMC" + 1

ACTOR_USER = "user"
ACTOR_API_KEY = "api_key"
ACTOR_SYSTEM = "system"
ACTOR_LINK = "connect_link"


@dataclass(slots=True)
class Actor:
    type: str
    id: str | None = None

    @classmethod
    def system(cls) -> "Actor":
        return cls(ACTOR_SYSTEM, "system")


@dataclass(slots=True)
class AuditRecord:
    action: str
    actor: Actor
    outcome: str = "success"
    tenant_id: uuid.UUID | None = None
    target: str | None = None
    request_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


def _canonical(prev_hash: str, *, at: datetime, actor_type: str, actor_id: str | None, tenant_id: uuid.UUID | None,
               action: str, target: str | None, outcome: str, request_id: str | None, details: dict[str, Any]) -> bytes:
    body = {
        "prev": prev_hash,
        "at": at.astimezone(UTC).isoformat(timespec="microseconds"),
        "actor_type": actor_type,
        "actor_id": actor_id,
        "tenant_id": str(tenant_id) if tenant_id else None,
        "action": action,
        "target": target,
        "outcome": outcome,
        "request_id": request_id,
        "details": details,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def entry_hash(prev_hash: str, entry: AuditEntry | AuditRecord) -> str:
    if isinstance(entry, AuditRecord):
        actor_type, actor_id = entry.actor.type, entry.actor.id
    else:
        actor_type, actor_id = entry.actor_type, entry.actor_id
    return hashlib.sha256(
        _canonical(
            prev_hash,
            at=entry.at,
            tenant_id=entry.tenant_id,
            action=entry.action,
            target=entry.target,
            outcome=entry.outcome,
            request_id=entry.request_id,
            details=entry.details or {},
            actor_type=actor_type,
            actor_id=actor_id,
        )
    ).hexdigest()


def _truncate(record: AuditRecord) -> AuditRecord:
    if record.target and len(record.target) > 300:
        record.target = record.target[:297] + "..."
    return record


async def _lock_chain(session: AsyncSession) -> None:
    """Serialize chain appends until this transaction ends."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        await session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _ADVISORY_LOCK_ID})
        return
    if session.info.get("audit_chain_locked"):
        return
    lock: asyncio.Lock = session.info["sqlite_audit_lock"]
    await lock.acquire()
    session.info["audit_chain_locked"] = True

    def release(*_args: object) -> None:
        if session.info.pop("audit_chain_locked", None):
            lock.release()

    sync_session: Session = session.sync_session
    event.listen(sync_session, "after_commit", release, once=True)
    event.listen(sync_session, "after_rollback", release, once=True)
    event.listen(sync_session, "after_soft_rollback", release, once=True)


async def _chained(session: AsyncSession, records: Iterable[AuditRecord]) -> list[dict[str, Any]]:
    """Lock the chain, then the column values of each record linked to the one before."""
    batch = [_truncate(r) for r in records]
    if not batch:
        return []
    await _lock_chain(session)
    prev = await session.scalar(select(AuditEntry.hash).order_by(AuditEntry.id.desc()).limit(1)) or GENESIS
    rows = []
    for record in batch:
        digest = entry_hash(prev, record)
        rows.append({
            "at": record.at, "actor_type": record.actor.type, "actor_id": record.actor.id,
            "tenant_id": record.tenant_id, "action": record.action, "target": record.target,
            "outcome": record.outcome, "request_id": record.request_id, "details": record.details,
            "prev_hash": prev, "hash": digest,
        })
        prev = digest
    return rows


async def append(session: AsyncSession, records: Iterable[AuditRecord]) -> list[AuditEntry]:
    """Add rows to the chain inside the caller's transaction (commit is the caller's)."""
    rows = [AuditEntry(**values) for values in await _chained(session, records)]
    session.add_all(rows)
    await session.flush()
    return rows


async def append_batch(session: AsyncSession, records: Iterable[AuditRecord]) -> int:
    """``append`` for the batching writer: one multi-row INSERT, no ORM objects, nothing returned."""
    rows = await _chained(session, records)
    if rows:
        await session.execute(insert(AuditEntry), rows)
    return len(rows)


async def record(session: AsyncSession, action: str, actor: Actor, **kwargs: Any) -> AuditEntry:
    return (await append(session, [AuditRecord(action=action, actor=actor, **kwargs)]))[0]


@dataclass(slots=True)
class ChainReport:
    rows: int = 0
    broken_at: int | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.broken_at is None


async def verify_chain(session: AsyncSession, *, batch: int = 1000) -> ChainReport:
    """Recompute every hash in id order; report the first row that does not fit."""
    report = ChainReport()
    prev = GENESIS
    last_id = 0
    while True:
        rows = (
            await session.scalars(
                select(AuditEntry).where(AuditEntry.id > last_id).order_by(AuditEntry.id).limit(batch)
            )
        ).all()
        if not rows:
            return report
        for row in rows:
            report.rows += 1
            if row.prev_hash != prev:
                report.broken_at, report.reason = row.id, "does not follow the row before (a row was removed or reordered)"
                return report
            if entry_hash(prev, row) != row.hash:
                report.broken_at, report.reason = row.id, "content does not match its hash (the row was altered)"
                return report
            prev = row.hash
            last_id = row.id
        session.expunge_all()


async def export_rows(
    session: AsyncSession,
    *,
    tenant_id: uuid.UUID | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    batch: int = 1000,
) -> AsyncIterator[dict[str, Any]]:
    """Rows as dicts in id order, for JSON-lines export."""
    last_id = 0
    while True:
        query = select(AuditEntry).where(AuditEntry.id > last_id).order_by(AuditEntry.id).limit(batch)
        if tenant_id is not None:
            query = query.where(AuditEntry.tenant_id == tenant_id)
        if since is not None:
            query = query.where(AuditEntry.at >= since)
        if until is not None:
            query = query.where(AuditEntry.at < until)
        rows = (await session.scalars(query)).all()
        if not rows:
            return
        for row in rows:
            last_id = row.id
            yield as_dict(row)


def as_dict(row: AuditEntry) -> dict[str, Any]:
    return {
        "id": row.id,
        "at": row.at.isoformat(),
        "actor_type": row.actor_type,
        "actor_id": row.actor_id,
        "tenant_id": str(row.tenant_id) if row.tenant_id else None,
        "action": row.action,
        "target": row.target,
        "outcome": row.outcome,
        "request_id": row.request_id,
        "details": row.details,
        "hash": row.hash,
        "prev_hash": row.prev_hash,
    }
