"""Envelope encryption of tokens and other per-tenant secrets.

- A master keyring (ids and 32-byte keys from settings or a key file; the first encrypts, all
  decrypt) wraps one data key per tenant with AES-256-GCM, the tenant id as associated data.
- Each secret is AES-256-GCM under its tenant's data key. The associated data binds it to the
  tenant, the owning row and the field, so a ciphertext copied to another row does not decrypt.
- Every ciphertext starts with its format version and the id of the data key that sealed it;
  every wrapped data key records its master key id. Master keys rotate by rewrapping data keys
  (``rewrap_all``) while the app serves; deleting a tenant's data key shreds its secrets.

A KMS can stand in for :class:`Keyring` behind the same two methods, ``wrap`` and ``unwrap``.
"""

from __future__ import annotations

import os
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORMAT_V1 = 1
_NONCE = 12
_HEADER = 1 + 16  # version byte + data key id


class VaultError(Exception):
    """A secret could not be sealed or opened (wrong row, tampering, missing key)."""


class MasterKeys(Protocol):
    primary_id: str

    def wrap(self, data_key: bytes, *, tenant_id: uuid.UUID) -> tuple[str, bytes]: ...

    def unwrap(self, master_key_id: str, wrapped: bytes, *, tenant_id: uuid.UUID) -> bytes: ...


class Keyring:
    """Master keys held in process memory."""

    def __init__(self, entries: list[tuple[str, bytes]]) -> None:
        if not entries:
            raise VaultError("the keyring holds no master key")
        self._keys = {key_id: AESGCM(key) for key_id, key in entries}
        self.primary_id = entries[0][0]
        self.ids = [key_id for key_id, _ in entries]

    @staticmethod
    def _aad(tenant_id: uuid.UUID) -> bytes:
        return b"smc:data-key:v1:" + tenant_id.bytes

    def wrap(self, data_key: bytes, *, tenant_id: uuid.UUID) -> tuple[str, bytes]:
        nonce = os.urandom(_NONCE)
        sealed = self._keys[self.primary_id].encrypt(nonce, data_key, self._aad(tenant_id))
        return self.primary_id, bytes([FORMAT_V1]) + nonce + sealed

    def unwrap(self, master_key_id: str, wrapped: bytes, *, tenant_id: uuid.UUID) -> bytes:
        aead = self._keys.get(master_key_id)
        if aead is None:
            raise VaultError(f"master key {master_key_id!r} is not in the keyring")
        if len(wrapped) < 1 + _NONCE + 16 or wrapped[0] != FORMAT_V1:
            raise VaultError("wrapped data key has an unknown format")
        try:
            return aead.decrypt(wrapped[1 : 1 + _NONCE], wrapped[1 + _NONCE :], self._aad(tenant_id))
        except InvalidTag as exc:
            raise VaultError("wrapped data key does not open for this tenant") from exc


def _aad(header: bytes, tenant_id: uuid.UUID, owner: str, field: str) -> bytes:
    return b"|".join((b"smc:secret", header, tenant_id.bytes, owner.encode(), field.encode()))


@dataclass(frozen=True, slots=True)
class DataKey:
    """A tenant's unwrapped data key: seals and opens that tenant's secrets."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    aead: AESGCM

    def seal(self, plaintext: str | bytes, *, owner: str | uuid.UUID, field: str) -> bytes:
        data = plaintext.encode() if isinstance(plaintext, str) else plaintext
        header = bytes([FORMAT_V1]) + self.id.bytes
        nonce = os.urandom(_NONCE)
        return header + nonce + self.aead.encrypt(nonce, data, _aad(header, self.tenant_id, str(owner), field))

    def open(self, blob: bytes, *, owner: str | uuid.UUID, field: str) -> bytes:
        if len(blob) < _HEADER + _NONCE + 16 or blob[0] != FORMAT_V1:
            raise VaultError(f"{field}: unknown ciphertext format")
        header = blob[:_HEADER]
        if header[1:] != self.id.bytes:
            raise VaultError(f"{field}: sealed under another data key")
        nonce = blob[_HEADER : _HEADER + _NONCE]
        try:
            return self.aead.decrypt(nonce, blob[_HEADER + _NONCE :], _aad(header, self.tenant_id, str(owner), field))
        except InvalidTag as exc:
            raise VaultError(f"{field}: does not open for this tenant, row and field") from exc

    def open_text(self, blob: bytes, *, owner: str | uuid.UUID, field: str) -> str:
        return self.open(blob, owner=owner, field=field).decode()


def data_key_id_of(blob: bytes) -> uuid.UUID:
    """The id of the data key a ciphertext was sealed under (for reports; no decryption)."""
    if len(blob) < _HEADER or blob[0] != FORMAT_V1:
        raise VaultError("unknown ciphertext format")
    return uuid.UUID(bytes=blob[1:_HEADER])


def new_data_key_material() -> bytes:
    return AESGCM.generate_key(bit_length=256)


class DataKeyCache:
    """Unwrapped data keys by (tenant, wrapped bytes): a rewrap or a shred misses the cache.

    Keyed by the exact wrapped bytes read from the database in the same query that needs the
    key, so it can never serve a key whose row is gone or changed.
    """

    def __init__(self, keyring: MasterKeys, max_entries: int = 10_000) -> None:
        self.keyring = keyring
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[uuid.UUID, str, bytes], DataKey] = OrderedDict()

    def get(self, *, key_id: uuid.UUID, tenant_id: uuid.UUID, master_key_id: str, wrapped: bytes) -> DataKey:
        cache_key = (tenant_id, master_key_id, wrapped)
        found = self._entries.get(cache_key)
        if found is not None:
            self._entries.move_to_end(cache_key)
            return found
        material = self.keyring.unwrap(master_key_id, wrapped, tenant_id=tenant_id)
        data_key = DataKey(key_id, tenant_id, AESGCM(material))
        self._entries[cache_key] = data_key
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return data_key

    def clear(self) -> None:
        self._entries.clear()
