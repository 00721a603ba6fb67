"""The audit log: append-only, each row chained to the one before by SHA-256.

Rows are written in the same transaction as the change they record, so a change and its audit
row land together or not at all. The chain is serialized across processes with a PostgreSQL
advisory lock held to the end of the transaction (SQLite, one process, uses a process lock).
Never put a token, a secret or a message body into ``details``.

Reading it (the dashboard's audit page and its export): ``AuditFilter`` selects rows, ``names_for``
reads the names behind a page's ids in one query per kind, ``action_words`` and ``detail_fields``
turn codes and details into text. None of it touches the chain.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, event, false, insert, or_, select, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from app.core.models import ApiKey, AuditEntry, ConnectLink, Tenant, User

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


_COPY_COLUMNS = ("at", "actor_type", "actor_id", "tenant_id", "action", "target", "outcome", "request_id", "details",
                 "prev_hash", "hash")


async def append_batch(session: AsyncSession, records: Iterable[AuditRecord]) -> int:
    """``append`` for the batching writer: no ORM objects, nothing returned. On PostgreSQL the rows
    go in one binary ``COPY`` on the session's own connection and transaction (after the chain's
    lock and last hash), with no per-row statement work; elsewhere in one multi-row INSERT."""
    rows = await _chained(session, records)
    if not rows:
        return 0
    conn = await session.connection()
    if conn.dialect.name != "postgresql":
        await session.execute(insert(AuditEntry), rows)
        return len(rows)
    raw = (await conn.get_raw_connection()).driver_connection
    assert raw is not None
    # details as SQLAlchemy's JSON type writes them (json.dumps); times are aware UTC already
    records_ = [(*(row[c] for c in _COPY_COLUMNS[:8]), json.dumps(row["details"]), row["prev_hash"], row["hash"])
                for row in rows]
    await raw.copy_records_to_table(AuditEntry.__tablename__, records=records_, columns=_COPY_COLUMNS)
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
    where: Sequence[ColumnElement[bool]] = (),
    batch: int = 1000,
) -> AsyncIterator[dict[str, Any]]:
    """Rows as dicts in id order, for JSON-lines export (``where``: more conditions, e.g. an
    ``AuditFilter``'s, so the dashboard's export and its page select the same rows)."""
    last_id = 0
    while True:
        query = select(AuditEntry).where(AuditEntry.id > last_id, *where).order_by(AuditEntry.id).limit(batch)
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


# -- reading the log: filters, names and words for the dashboard's page and its export -------------

# What an action means, in words; an action not listed here is shown by its code.
ACTION_WORDS: dict[str, str] = {
    "api_key.create": "API key created",
    "api_key.revoke": "API key revoked",
    "audit.export": "Audit log exported",
    "baa.revoke": "BAA revoked",
    "baa.sign": "BAA recorded as signed",
    "connect_link.create": "Connect link created",
    "connect_link.open": "Connect link opened",
    "connect_link.redeem": "Connect link opened",
    "connect_link.reissue": "Connect link re-issued",
    "connect_link.revoke": "Connect link revoked",
    "connect_link.use": "Connection made through a connect link",
    "connection.authorize": "Sent to Salesmsg to authorize",
    "connection.connect": "Connected",
    "connection.disconnect": "Disconnected",
    "connection.needs_reauth": "Connection needs reconnecting",
    "dashboard.phi_access": "PHI viewed in the dashboard",
    "invitation.create": "Invitation sent",
    "invitation.reissue": "Invitation re-issued",
    "invitation.revoke": "Invitation revoked",
    "mfa.disable": "Two-step sign-in turned off",
    "mfa.enrol": "Two-step sign-in set up",
    "mfa.recovery_code_used": "Recovery code used",
    "mfa.recovery_codes": "New recovery codes made",
    "mfa.reset": "Two-step sign-in reset",
    "mfa.verify": "Two-step sign-in code checked",
    "password.change": "Password changed",
    "password.reset_issued": "Password reset link made",
    "password.reset_used": "Password reset with a link",
    "proxy.phi_access": "PHI called through the proxy",
    "tenant.create": "Tenant created",
    "tenant.delete": "Tenant deleted",
    "tenant.hipaa": "HIPAA setting changed",
    "tenant.rename": "Tenant renamed",
    "user.create": "Person added",
    "user.disable": "Person disabled",
    "user.enable": "Person enabled",
    "webhook.clear": "Webhook removed",
    "webhook.set": "Webhook set",
}

_ACTOR_WORDS = {ACTOR_SYSTEM: "System (background worker)", "worker": "Background worker", "cli": "Command line"}


def action_words(action: str) -> str | None:
    """The action in words, or None when only its code says it."""
    return ACTION_WORDS.get(action)


@dataclass(frozen=True, slots=True)
class AuditFilter:
    """What the audit page and its export select. Tenant and period narrow through the indexes
    (``ix_audit_log_tenant_id_at``, ``ix_audit_log_at``); actor, action and outcome are plain
    comparisons checked while the primary key is walked newest first under a LIMIT, so a page
    reads its rows and stops. The actor's free text is resolved first to the ids it stands for
    (``actor_ids_matching``), never matched with LIKE over the log itself."""

    tenant_id: uuid.UUID | None = None
    no_tenant: bool = False  # a tenant was named that does not exist: nothing matches
    actor_text: str = ""
    actor_ids: frozenset[str] = frozenset()
    action_prefix: str = ""
    outcome: str = ""
    since: datetime | None = None
    until: datetime | None = None

    def clauses(self) -> list[ColumnElement[bool]]:
        where: list[ColumnElement[bool]] = []
        if self.no_tenant:
            where.append(false())
        if self.tenant_id is not None:
            where.append(AuditEntry.tenant_id == self.tenant_id)
        if self.actor_text:
            where.append(or_(
                AuditEntry.actor_id.in_(sorted(self.actor_ids | {self.actor_text})),
                AuditEntry.actor_id.startswith(self.actor_text, autoescape=True),
                AuditEntry.actor_type == self.actor_text,
            ))
        if self.action_prefix:
            where.append(AuditEntry.action.startswith(self.action_prefix, autoescape=True))
        if self.outcome:
            where.append(AuditEntry.outcome == self.outcome)
        if self.since is not None:
            where.append(AuditEntry.at >= self.since)
        if self.until is not None:
            where.append(AuditEntry.at < self.until)
        return where


def _contains(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


async def actor_ids_matching(session: AsyncSession, text: str, *, limit: int = 500) -> frozenset[str]:
    """The actor ids a free-text actor filter stands for: people whose e-mail or name contains it
    (a person's actor id is their e-mail) and API keys whose name or prefix contains it (a key's
    actor id is its id; a refused call's is ``prefix:<prefix>``). Both tables are small."""
    like = _contains(text)
    emails = (await session.scalars(
        select(User.email).where(or_(User.email.ilike(like, escape="\\"), User.name.ilike(like, escape="\\"))).limit(limit)
    )).all()
    keys = (await session.execute(
        select(ApiKey.id, ApiKey.prefix)
        .where(or_(ApiKey.name.ilike(like, escape="\\"), ApiKey.prefix.ilike(like, escape="\\"))).limit(limit)
    )).all()
    return frozenset([*emails, *(str(k.id) for k in keys), *(f"prefix:{k.prefix}" for k in keys)])


@dataclass(frozen=True, slots=True)
class ActorName:
    """Who did it, as the page shows it: a name, and a second line of detail (e-mail, key prefix)."""

    label: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class TenantName:
    slug: str
    name: str


@dataclass(slots=True)
class Names:
    """The names behind a page of rows: one query per kind (people, keys, links, tenants)."""

    actors: dict[tuple[str, str | None], ActorName] = field(default_factory=dict)
    tenants: dict[uuid.UUID, TenantName] = field(default_factory=dict)

    def actor(self, row: AuditEntry) -> ActorName:
        return self.actors.get((row.actor_type, row.actor_id)) or ActorName(row.actor_type, row.actor_id or "")

    def tenant(self, tenant_id: uuid.UUID | None) -> TenantName | None:
        return self.tenants.get(tenant_id) if tenant_id else None


def _uuid(value: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(value) if value else None
    except ValueError:
        return None


async def names_for(session: AsyncSession, rows: Sequence[AuditEntry]) -> Names:
    names = Names()
    emails = {r.actor_id for r in rows if r.actor_type == ACTOR_USER and r.actor_id}
    key_ids = {u for r in rows if r.actor_type == ACTOR_API_KEY and (u := _uuid(r.actor_id))}
    link_ids = {u for r in rows if r.actor_type == ACTOR_LINK and (u := _uuid(r.actor_id))}
    people = {u.email: u for u in (await session.scalars(select(User).where(User.email.in_(emails)))).all()} if emails else {}
    keys = {str(k.id): k for k in (await session.scalars(select(ApiKey).where(ApiKey.id.in_(key_ids)))).all()} if key_ids else {}
    link_tenants = {str(i): t for i, t in (await session.execute(
        select(ConnectLink.id, ConnectLink.tenant_id).where(ConnectLink.id.in_(link_ids))
    )).all()} if link_ids else {}
    tenant_ids = {r.tenant_id for r in rows if r.tenant_id} | set(link_tenants.values())
    if tenant_ids:
        for tenant in (await session.scalars(select(Tenant).where(Tenant.id.in_(tenant_ids)))).all():
            names.tenants[tenant.id] = TenantName(tenant.slug, tenant.name)
    for row in rows:
        key = (row.actor_type, row.actor_id)
        if key in names.actors:
            continue
        names.actors[key] = _actor_name(row, people, keys, link_tenants, names.tenants)
    return names


def _actor_name(row: AuditEntry, people: dict[str, User], keys: dict[str, ApiKey],
                link_tenants: dict[str, uuid.UUID], tenants: dict[uuid.UUID, TenantName]) -> ActorName:
    kind, ident = row.actor_type, row.actor_id or ""
    if kind == ACTOR_USER:
        person = people.get(ident)
        return ActorName(person.name or person.email, person.email if person.name else "") if person else ActorName(ident, "former user")
    if kind == ACTOR_API_KEY:
        key = keys.get(ident)
        if key is not None:
            return ActorName(f"API key {key.name}", key.prefix)
        if ident.startswith("prefix:"):
            return ActorName("Unknown API key", ident.removeprefix("prefix:"))
        return ActorName("API key (deleted)", ident[:8])
    if kind == ACTOR_LINK:
        tenant_id = link_tenants.get(ident) or row.tenant_id
        tenant = tenants.get(tenant_id) if tenant_id else None
        return ActorName(f"Connect link for {tenant.name}" if tenant else "Connect link")
    if kind == "invitation":
        return ActorName("Invitation", ident)
    if kind == "cli" and ident == "demo":
        return ActorName("Demo set-up (command line)")
    return ActorName(_ACTOR_WORDS.get(kind, kind.replace("_", " ").capitalize()), "" if ident in ("", kind) else ident)


def _compact(value: Any) -> str:
    """One value as short text: lists joined, mappings as ``key value`` pairs, never a repr."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_compact(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_compact(v) for v in value]
        return ("; " if any(isinstance(v, dict) for v in value) else ", ").join(items) or "none"
    return str(value)


def detail_fields(details: dict[str, Any] | None) -> list[tuple[str, str]]:
    """A row's details as labelled fields for the page (``read_only`` -> "read only")."""
    return [(str(key).replace("_", " "), _compact(value)) for key, value in (details or {}).items()]
