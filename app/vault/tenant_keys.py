"""Tenant data keys in the database: create, load, rewrap under a new master key, verify, shred."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.core.db import Database
from app.core.models import Connection, IdempotencyRecord, OAuthState, Tenant, TenantKey
from app.vault.envelope import (
    DataKey,
    DataKeyCache,
    MasterKeys,
    VaultError,
    new_data_key_material,
)


async def create_data_key(session: AsyncSession, keyring: MasterKeys, tenant_id: uuid.UUID) -> TenantKey:
    master_key_id, wrapped = keyring.wrap(new_data_key_material(), tenant_id=tenant_id)
    row = TenantKey(id=uuid.uuid4(), tenant_id=tenant_id, master_key_id=master_key_id, wrapped_key=wrapped)
    session.add(row)
    await session.flush()
    return row


async def load_data_key(session: AsyncSession, cache: DataKeyCache, tenant_id: uuid.UUID) -> DataKey:
    row = await session.scalar(select(TenantKey).where(TenantKey.tenant_id == tenant_id))
    if row is None:
        raise VaultError("the tenant has no data key (shredded or never created)")
    return cache.get(key_id=row.id, tenant_id=tenant_id, master_key_id=row.master_key_id, wrapped=row.wrapped_key)


async def data_key_for(session: AsyncSession, cache: DataKeyCache, tenant_id: uuid.UUID) -> DataKey:
    """The tenant's data key, created on first use."""
    row = await session.scalar(select(TenantKey).where(TenantKey.tenant_id == tenant_id))
    if row is None:
        row = await create_data_key(session, cache.keyring, tenant_id)
    return cache.get(key_id=row.id, tenant_id=tenant_id, master_key_id=row.master_key_id, wrapped=row.wrapped_key)


@dataclass
class RotateReport:
    rewrapped: int = 0
    already_current: int = 0
    primary: str = ""


async def rewrap_all(db: Database, keyring: MasterKeys, *, batch: int = 200) -> RotateReport:
    """Rewrap every data key not yet under the primary master key, a batch per transaction.

    Safe while the app serves: a token's ciphertext does not change, only its data key's
    wrapping, and each row is rewritten atomically.
    """
    report = RotateReport(primary=keyring.primary_id)
    last_id: uuid.UUID | None = None
    while True:
        async with db.session() as session:
            query = select(TenantKey).order_by(TenantKey.id).limit(batch)
            if last_id is not None:
                query = query.where(TenantKey.id > last_id)
            if db.is_postgres:
                query = query.with_for_update(skip_locked=False)
            rows = (await session.scalars(query)).all()
            if not rows:
                return report
            for row in rows:
                last_id = row.id
                if row.master_key_id == keyring.primary_id:
                    report.already_current += 1
                    continue
                material = keyring.unwrap(row.master_key_id, row.wrapped_key, tenant_id=row.tenant_id)
                row.master_key_id, row.wrapped_key = keyring.wrap(material, tenant_id=row.tenant_id)
                row.rotated_at = datetime.now(UTC)
                report.rewrapped += 1


@dataclass
class VerifyReport:
    tenants: int = 0
    secrets: int = 0
    failures: list[str] = field(default_factory=list)
    by_master_key: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures


async def verify_all(db: Database, cache: DataKeyCache) -> VerifyReport:
    """Open every data key and every secret sealed under it; list what fails."""
    report = VerifyReport()
    async with db.session() as session:
        tenants = (await session.scalars(select(Tenant).order_by(Tenant.slug))).all()
        for tenant in tenants:
            report.tenants += 1
            row = await session.scalar(select(TenantKey).where(TenantKey.tenant_id == tenant.id))
            sealed = await _sealed_secrets(session, tenant)
            if row is None:
                if sealed:
                    report.failures.append(f"{tenant.slug}: {len(sealed)} secrets but no data key")
                continue
            report.by_master_key[row.master_key_id] = report.by_master_key.get(row.master_key_id, 0) + 1
            try:
                key = cache.get(key_id=row.id, tenant_id=tenant.id, master_key_id=row.master_key_id, wrapped=row.wrapped_key)
            except VaultError as exc:
                report.failures.append(f"{tenant.slug}: data key: {exc}")
                continue
            for owner, field_name, blob in sealed:
                report.secrets += 1
                try:
                    key.open(blob, owner=owner, field=field_name)
                except VaultError as exc:
                    report.failures.append(f"{tenant.slug}: {exc}")
    return report


async def _sealed_secrets(session: AsyncSession, tenant: Tenant) -> list[tuple[str, str, bytes]]:
    sealed: list[tuple[str, str, bytes]] = []
    if tenant.webhook_secret_ct:
        sealed.append((str(tenant.id), "webhook_secret", tenant.webhook_secret_ct))
    for conn in (await session.scalars(select(Connection).where(Connection.tenant_id == tenant.id))).all():
        if conn.access_token_ct:
            sealed.append((str(conn.id), "access_token", conn.access_token_ct))
        if conn.refresh_token_ct:
            sealed.append((str(conn.id), "refresh_token", conn.refresh_token_ct))
    states = await session.scalars(
        select(OAuthState).where(OAuthState.tenant_id == tenant.id, OAuthState.pkce_verifier_ct.is_not(None))
    )
    for state in states.all():
        sealed.append((str(state.id), "pkce_verifier", state.pkce_verifier_ct or b""))
    records = await session.scalars(
        select(IdempotencyRecord).where(IdempotencyRecord.tenant_id == tenant.id, IdempotencyRecord.body_ct.is_not(None))
    )
    for rec in records.all():
        sealed.append((f"idempotency:{rec.key}", "response_body", rec.body_ct or b""))
    return sealed


async def shred(session: AsyncSession, tenant_id: uuid.UUID) -> bool:
    """Delete the tenant's data key: every secret sealed under it becomes unreadable."""
    row = await session.scalar(select(TenantKey).where(TenantKey.tenant_id == tenant_id))
    if row is None:
        return False
    await session.delete(row)
    await session.flush()
    return True
