"""Tenants, BAA, audit chain and data keys against the real database."""

from __future__ import annotations

import base64
import os

import pytest
from sqlalchemy import select, text

from app.audit import audit_log
from app.audit.audit_log import Actor
from app.connections import policy
from app.core.errors import Conflict, ValidationFailed
from app.core.models import AuditEntry, Connection, TenantKey
from app.tenants import baa, registry
from app.vault import tenant_keys
from app.vault.envelope import DataKeyCache, Keyring, VaultError
from tests.support.processes import clean_env, run_cli

OPERATOR = Actor("user", "op@example.com")


@pytest.fixture
def ring() -> Keyring:
    return Keyring([("k1", os.urandom(32))])


async def test_tenants_default_to_hipaa_and_slugs_are_unique(db_session, ring):
    tenant = await registry.create_tenant(db_session, keyring=ring, slug="acme-clinic", name="Acme Clinic", actor=OPERATOR)
    assert tenant.hipaa is True and not policy.tenant_phi_allowed(tenant)
    with pytest.raises(Conflict):
        await registry.create_tenant(db_session, keyring=ring, slug="acme-clinic", name="Other", actor=OPERATOR)
    for slug in ["A", "-x", "x-", "a--b", "no spaces", "api", "x" * 64, "ünï"]:
        with pytest.raises(ValidationFailed):
            await registry.create_tenant(db_session, keyring=ring, slug=slug, name="N", actor=OPERATOR)
    assert (await registry.get_tenant(db_session, str(tenant.id))).slug == "acme-clinic"
    assert (await registry.get_tenant(db_session, "ACME-CLINIC")).id == tenant.id


async def test_baa_sign_and_revoke_are_audited_and_gate_phi(db_session, ring):
    tenant = await registry.create_tenant(db_session, keyring=ring, slug="bright", name="Bright Dental", actor=OPERATOR)
    with pytest.raises(ValidationFailed):
        await baa.sign(db_session, tenant, reference="  ", signed_by="op", actor=OPERATOR)
    await baa.sign(db_session, tenant, reference="BAA-7", note="countersigned", signed_by="op@example.com", actor=OPERATOR)
    assert policy.tenant_phi_allowed(tenant) and tenant.baa_reference == "BAA-7"
    with pytest.raises(Conflict):
        await baa.sign(db_session, tenant, reference="BAA-8", signed_by="op", actor=OPERATOR)
    await baa.revoke(db_session, tenant, reason="expired", actor=OPERATOR)
    assert not policy.tenant_phi_allowed(tenant) and tenant.baa_signed_at is None
    actions = (await db_session.scalars(select(AuditEntry.action).where(AuditEntry.tenant_id == tenant.id).order_by(AuditEntry.id))).all()
    assert actions == ["tenant.create", "baa.sign", "baa.revoke"]


async def test_audit_chain_verifies_and_finds_an_altered_row(db_session, on_postgres):
    for i in range(5):
        await audit_log.record(db_session, "test.event", Actor.system(), target=f"t{i}", details={"n": i})
    report = await audit_log.verify_chain(db_session)
    assert report.ok and report.rows == 5
    third = (await db_session.scalars(select(AuditEntry).order_by(AuditEntry.id).offset(2).limit(1))).one()
    if on_postgres:
        await db_session.execute(text("SET LOCAL session_replication_role = replica"))
    else:
        await db_session.execute(text("DROP TRIGGER audit_log_no_update"))
    await db_session.execute(text("UPDATE audit_log SET target = 'forged' WHERE id = :id"), {"id": third.id})
    db_session.expunge_all()
    report = await audit_log.verify_chain(db_session)
    assert not report.ok and report.broken_at == third.id and "altered" in report.reason


async def test_batched_audit_rows_keep_their_order_and_extend_the_chain(db_session):
    from app.audit.audit_log import AuditRecord

    await audit_log.record(db_session, "test.before", Actor.system(), target="first")
    batch = [AuditRecord(action="proxy.phi_access", actor=Actor.system(), target=f"GET /c/{i}", details={"i": i})
             for i in range(300)]
    assert await audit_log.append_batch(db_session, batch) == 300
    await audit_log.record(db_session, "test.after", Actor.system(), target="last")
    targets = (await db_session.scalars(select(AuditEntry.target).order_by(AuditEntry.id))).all()
    assert targets == ["first", *(f"GET /c/{i}" for i in range(300)), "last"]
    report = await audit_log.verify_chain(db_session)
    assert report.ok and report.rows == 302


async def test_data_keys_rotate_and_old_master_key_can_go(database_url):
    from app.core.db import Database, create_engine
    from app.core.settings import Settings

    old = ("old", os.urandom(32))
    new = ("new", os.urandom(32))
    db = Database(create_engine(Settings(_env_file=None, database_url=database_url)))
    try:
        old_ring = Keyring([old])
        async with db.session() as session:
            t = await registry.create_tenant(session, keyring=old_ring, slug="rot", name="Rot", actor=OPERATOR)
            key = await tenant_keys.load_data_key(session, DataKeyCache(old_ring), t.id)
            conn = Connection(tenant_id=t.id, kind="oauth", status="active", scopes="teams:read")
            session.add(conn)
            await session.flush()
            conn.access_token_ct = key.seal("at-1", owner=conn.id, field="access_token")
        rotated_ring = Keyring([new, old])
        report = await tenant_keys.rewrap_all(db, rotated_ring)
        assert report.rewrapped == 1
        assert (await tenant_keys.rewrap_all(db, rotated_ring)).already_current == 1
        only_new = Keyring([new])
        verify = await tenant_keys.verify_all(db, DataKeyCache(only_new))
        assert verify.ok and verify.secrets == 1 and verify.by_master_key == {"new": 1}
        assert (await tenant_keys.verify_all(db, DataKeyCache(Keyring([old])))).ok is False
    finally:
        await db.dispose()


async def test_shredding_the_data_key_makes_tokens_unreadable(db_session, ring):
    t = await registry.create_tenant(db_session, keyring=ring, slug="shred", name="Shred", actor=OPERATOR)
    cache = DataKeyCache(ring)
    key = await tenant_keys.load_data_key(db_session, cache, t.id)
    blob = key.seal("token", owner="c", field="access_token")
    assert await tenant_keys.shred(db_session, t.id)
    assert await db_session.scalar(select(TenantKey).where(TenantKey.tenant_id == t.id)) is None
    with pytest.raises(VaultError):
        await tenant_keys.load_data_key(db_session, DataKeyCache(ring), t.id)
    assert blob  # the ciphertext may survive in a backup; without the data key it is noise


def test_cli_keys_rotate_then_verify_without_the_old_key(database_url):
    old = "old:" + base64.b64encode(os.urandom(32)).decode()
    new = "new:" + base64.b64encode(os.urandom(32)).decode()
    env = clean_env(SMC_DATABASE_URL=database_url, SMC_MASTER_KEYS=old)
    assert run_cli("tenant", "create", "--slug", "cli-rot", "--name", "Cli Rot", env=env).returncode == 0
    env["SMC_MASTER_KEYS"] = f"{new},{old}"
    rotated = run_cli("keys", "rotate", "--json", env=env)
    assert rotated.returncode == 0, rotated.stderr
    assert '"rewrapped": 1' in rotated.stdout
    env["SMC_MASTER_KEYS"] = new
    verified = run_cli("keys", "verify", "--json", env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert '"ok": true' in verified.stdout
    env["SMC_MASTER_KEYS"] = old
    assert run_cli("keys", "verify", env=env).returncode == 1


def test_cli_tenant_delete_shreds_its_data_key(database_url):
    env = clean_env(SMC_DATABASE_URL=database_url)
    assert run_cli("tenant", "create", "--slug", "gone-soon", "--name", "Gone", env=env).returncode == 0
    deleted = run_cli("tenant", "delete", "--slug", "gone-soon", "--yes", env=env)
    assert deleted.returncode == 0, deleted.stderr
    listed = run_cli("tenant", "list", "--json", env=env)
    assert "gone-soon" not in listed.stdout
    verified = run_cli("audit", "verify", "--json", env=env)
    assert verified.returncode == 0 and '"ok": true' in verified.stdout
    assert run_cli("tenant", "delete", "--slug", "gone-soon", "--yes", env=env).returncode == 1
