"""Envelope encryption: binding to tenant, row and field; rotation; shredding (pure parts)."""

from __future__ import annotations

import base64
import os
import uuid

import pytest

from app.vault.envelope import (
    DataKey,
    DataKeyCache,
    Keyring,
    VaultError,
    data_key_id_of,
    new_data_key_material,
)


def keyring(*ids: str) -> tuple[Keyring, list[tuple[str, bytes]]]:
    entries = [(i, os.urandom(32)) for i in ids]
    return Keyring(entries), entries


def make_key(ring: Keyring, tenant: uuid.UUID) -> tuple[DataKey, str, bytes]:
    master_id, wrapped = ring.wrap(new_data_key_material(), tenant_id=tenant)
    key_id = uuid.uuid4()
    return DataKeyCache(ring).get(key_id=key_id, tenant_id=tenant, master_key_id=master_id, wrapped=wrapped), master_id, wrapped


def test_seal_open_round_trip_and_ciphertext_records_its_key():
    ring, _ = keyring("k1")
    tenant, conn = uuid.uuid4(), uuid.uuid4()
    key, _, _ = make_key(ring, tenant)
    blob = key.seal("access-token-value", owner=conn, field="access_token")
    assert b"access-token-value" not in blob
    assert blob[0] == 1 and data_key_id_of(blob) == key.id
    assert key.open_text(blob, owner=conn, field="access_token") == "access-token-value"


@pytest.mark.parametrize("change", ["owner", "field", "tenant"])
def test_ciphertext_copied_elsewhere_does_not_open(change):
    ring, _ = keyring("k1")
    tenant, conn = uuid.uuid4(), uuid.uuid4()
    key, master_id, wrapped = make_key(ring, tenant)
    blob = key.seal("secret", owner=conn, field="access_token")
    with pytest.raises(VaultError):
        if change == "owner":
            key.open(blob, owner=uuid.uuid4(), field="access_token")
        elif change == "field":
            key.open(blob, owner=conn, field="refresh_token")
        else:
            other_tenant = uuid.uuid4()
            other, _, _ = make_key(ring, other_tenant)
            other.open(blob, owner=conn, field="access_token")


def test_tampered_ciphertext_does_not_open():
    ring, _ = keyring("k1")
    tenant, conn = uuid.uuid4(), uuid.uuid4()
    key, _, _ = make_key(ring, tenant)
    blob = bytearray(key.seal("secret", owner=conn, field="f"))
    blob[-1] ^= 1
    with pytest.raises(VaultError):
        key.open(bytes(blob), owner=conn, field="f")


def test_wrapped_data_key_is_bound_to_its_tenant():
    ring, _ = keyring("k1")
    tenant = uuid.uuid4()
    master_id, wrapped = ring.wrap(new_data_key_material(), tenant_id=tenant)
    with pytest.raises(VaultError):
        ring.unwrap(master_id, wrapped, tenant_id=uuid.uuid4())


def test_first_key_encrypts_all_keys_decrypt_and_a_removed_key_fails():
    old_ring, old_entries = keyring("old")
    tenant = uuid.uuid4()
    material = new_data_key_material()
    master_id, wrapped = old_ring.wrap(material, tenant_id=tenant)
    new_entry = ("new", os.urandom(32))
    both = Keyring([new_entry, *old_entries])
    assert both.primary_id == "new"
    assert both.unwrap(master_id, wrapped, tenant_id=tenant) == material
    rewrapped_id, rewrapped = both.wrap(material, tenant_id=tenant)
    assert rewrapped_id == "new"
    only_new = Keyring([new_entry])
    assert only_new.unwrap(rewrapped_id, rewrapped, tenant_id=tenant) == material
    with pytest.raises(VaultError, match="not in the keyring"):
        only_new.unwrap(master_id, wrapped, tenant_id=tenant)


def test_settings_parse_master_keys():
    from app.core.settings import parse_master_keys

    good = base64.b64encode(b"x" * 32).decode()
    assert parse_master_keys(f"a:{good}, b:{good}") == [("a", b"x" * 32), ("b", b"x" * 32)]
    for bad in ["", "nokey", f"a:{base64.b64encode(b'short').decode()}", f"a:{good},a:{good}", "a:!!notbase64"]:
        with pytest.raises(ValueError):
            parse_master_keys(bad)
