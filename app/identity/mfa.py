"""TOTP (RFC 6238) second factor and one-time recovery codes.

What must always hold here:

- **The secret is sealed, never stored in clear.** Each secret gets its own random AES-256 data
  key, wrapped by the master keyring (``MasterKeys.wrap``, the interface a KMS can stand in for)
  under a key scope derived from the user id, so it never shares a key with a tenant and does not
  depend on one (operators have no tenant; deleting a tenant must not lock its admin out). The
  secret is AES-256-GCM under that data key with the user id in the associated data, so a
  ciphertext copied to another user's row does not open. ``users.mfa_secret_ct`` holds the
  format version, the master key id, the wrapped data key and the sealed secret; a secret found
  under a master key that is no longer the primary is resealed at its next use, and
  ``keys rotate`` / ``keys verify`` reseal and open them all (``rewrap_all``, ``verify_all``).
- **A code is accepted once.** A code is checked for the previous, current and next 30-second
  step (``valid_window=1``); the step it matched is recorded in ``users.mfa_last_step`` with one
  conditional UPDATE (``WHERE mfa_last_step < step``), so a code of the same or an earlier step
  is refused (``mfa_code_reused``), even when two requests race with it.
- **Guessing is limited.** Every code is a ``login_attempts`` row of kind ``totp``, committed
  as failed before it is checked (so parallel requests cannot outrun the count) and marked right
  when it is, and ``mfa_attempts_per_15_minutes`` failures by email or IP refuse further
  codes (429 ``too_many_attempts``); each failure is audited (``mfa.verify``, outcome denied).
- **Recovery codes are shown once and stored hashed.** Ten codes of 60 random bits each (12
  base-32 characters). They are stored as SHA-256 over the user id and the code, not argon2: a
  code is not a human-chosen secret, 2^60 guesses per code is out of reach of an offline search
  of a stolen table, and a hash with no salt lookup lets one query find and spend the code
  (argon2 would mean verifying all ten slow hashes per attempt). Online guessing is limited as
  above. A code is spent with one conditional UPDATE, so it works once.
- **Changing MFA ends every session of the person** (turning it on or off, new recovery codes):
  a session opened with a stolen password does not survive; the page that made the change
  starts a new session for its own browser.
- MFA is **on** when ``mfa_enabled_at`` is set; a secret without it is an enrolment waiting for
  its first code.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import pyotp
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import CursorResult, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.audit import audit_log
from app.audit.audit_log import Actor
from app.core.db import Database
from app.core.errors import Conflict, Forbidden, ValidationFailed
from app.core.models import RecoveryCode, User
from app.identity import people, sessions
from app.vault.envelope import MasterKeys, VaultError

ISSUER = "Salesmsg Connect"
STEP_SECONDS = 30
RECOVERY_CODES = 10
_RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i: read aloud and typed from paper
_RECOVERY_LENGTH = 12  # 31^12 > 2^59
_FORMAT_V1 = 1
_NONCE = 12
_KEY_SCOPE = uuid.UUID("6d3c1f8e-4f0b-5a52-9d2e-6d66615f7365")  # namespace of the per-user wrapping scope


# ---- sealing the secret -------------------------------------------------------------------


def _scope(user_id: uuid.UUID) -> uuid.UUID:
    """The id the data key is wrapped under: derived from the user id, never a tenant's id."""
    return uuid.uuid5(_KEY_SCOPE, f"mfa:{user_id}")


def _aad(user_id: uuid.UUID) -> bytes:
    return b"smc:mfa-secret:v1|" + user_id.bytes


def seal_secret(keyring: MasterKeys, user_id: uuid.UUID, secret: str) -> bytes:
    data_key = AESGCM.generate_key(bit_length=256)
    master_key_id, wrapped = keyring.wrap(data_key, tenant_id=_scope(user_id))
    nonce = os.urandom(_NONCE)
    sealed = AESGCM(data_key).encrypt(nonce, secret.encode(), _aad(user_id))
    mk = master_key_id.encode()
    return bytes([_FORMAT_V1, len(mk)]) + mk + struct.pack(">H", len(wrapped)) + wrapped + nonce + sealed


def _parse(blob: bytes) -> tuple[str, bytes, bytes, bytes]:
    try:
        if blob[0] != _FORMAT_V1:
            raise VaultError("mfa secret: unknown format")
        mk_len = blob[1]
        master_key_id = blob[2 : 2 + mk_len].decode()
        at = 2 + mk_len
        (wrapped_len,) = struct.unpack(">H", blob[at : at + 2])
        wrapped = blob[at + 2 : at + 2 + wrapped_len]
        rest = blob[at + 2 + wrapped_len :]
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise VaultError("mfa secret: malformed") from exc
    if len(wrapped) != wrapped_len or len(rest) < _NONCE + 16:
        raise VaultError("mfa secret: malformed")
    return master_key_id, wrapped, rest[:_NONCE], rest[_NONCE:]


def open_secret(keyring: MasterKeys, user_id: uuid.UUID, blob: bytes) -> str:
    master_key_id, wrapped, nonce, sealed = _parse(blob)
    data_key = keyring.unwrap(master_key_id, wrapped, tenant_id=_scope(user_id))
    try:
        return AESGCM(data_key).decrypt(nonce, sealed, _aad(user_id)).decode()
    except InvalidTag as exc:
        raise VaultError("mfa secret: does not open for this user") from exc


def secret_of(keyring: MasterKeys, user: User) -> str:
    if not user.mfa_secret_ct:
        raise Conflict("Two-step sign-in is not set up.", code="mfa_not_enrolled")
    return open_secret(keyring, user.id, user.mfa_secret_ct)


def _reseal_if_old(keyring: MasterKeys, user: User, secret: str) -> None:
    if user.mfa_secret_ct and _parse(user.mfa_secret_ct)[0] != keyring.primary_id:
        user.mfa_secret_ct = seal_secret(keyring, user.id, secret)


# ---- what the pages show ------------------------------------------------------------------


def provisioning_uri(secret: str, email: str) -> str:
    return pyotp.TOTP(secret).provisioning_uri(name=email, issuer_name=ISSUER)


def qr_svg(uri: str) -> str:
    """The otpauth URI as inline SVG markup (no style attributes, so the CSP needs no exception)."""
    import segno

    return segno.make(uri, error="m").svg_inline(scale=4, dark="#000", light="#fff")


def grouped(secret: str) -> str:
    """The secret in groups of four, for typing into an app by hand."""
    return " ".join(secret[i : i + 4] for i in range(0, len(secret), 4))


def is_enabled(user: User) -> bool:
    return user.mfa_enabled_at is not None


def enrolment_pending(user: User) -> bool:
    return user.mfa_enabled_at is None and user.mfa_secret_ct is not None


# ---- checking a code ----------------------------------------------------------------------


@dataclass
class Verified:
    method: str  # "totp" or "recovery_code"
    recovery_codes_left: int | None = None


def _normal_totp(code: str) -> str:
    return "".join(code.split()).replace("-", "")


def _normal_recovery(code: str) -> str:
    return "".join(c for c in code.lower() if c.isalnum())


def _recovery_hash(user_id: uuid.UUID, code: str) -> str:
    return hashlib.sha256(b"smc:recovery:v1|" + user_id.bytes + b"|" + _normal_recovery(code).encode()).hexdigest()


def _six_digits(code: str) -> bool:
    """Six ASCII digits (``str.isdigit`` alone also takes other scripts' digits and superscripts)."""
    return len(code) == 6 and code.isascii() and code.isdigit()


def _matching_step(secret: str, code: str, now: float | None = None) -> int | None:
    """The time step (previous, current or next) whose code this is, or None."""
    if not _six_digits(code):
        return None
    totp = pyotp.TOTP(secret)
    current = int((time.time() if now is None else now) // STEP_SECONDS)
    found = None
    for step in (current - 1, current, current + 1):  # valid_window=1; every step compared (constant work)
        if hmac.compare_digest(totp.at(step * STEP_SECONDS).encode(), code.encode()):
            found = step
    return found


async def _take_step(session: AsyncSession, user: User, step: int) -> bool:
    """Record ``step`` as used; False when this or a later step was used already."""
    result = cast(
        CursorResult[Any],
        await session.execute(
            update(User)
            .where(User.id == user.id, or_(User.mfa_last_step.is_(None), User.mfa_last_step < step))
            .values(mfa_last_step=step)
            .execution_options(synchronize_session=False)
        ),
    )
    if result.rowcount == 1:
        user.mfa_last_step = step
        return True
    return False


async def _spend_recovery_code(session: AsyncSession, user: User, code: str) -> bool:
    found = await session.scalar(
        select(RecoveryCode.id).where(
            RecoveryCode.user_id == user.id,
            RecoveryCode.code_hash == _recovery_hash(user.id, code),
            RecoveryCode.used_at.is_(None),
        )
    )
    if found is None:
        return False
    result = cast(
        CursorResult[Any],
        await session.execute(
            update(RecoveryCode)
            .where(RecoveryCode.id == found, RecoveryCode.used_at.is_(None))
            .values(used_at=datetime.now(UTC))
            .execution_options(synchronize_session=False)
        ),
    )
    return result.rowcount == 1


async def recovery_codes_left(session: AsyncSession, user: User) -> int:
    return len((await session.scalars(
        select(RecoveryCode.id).where(RecoveryCode.user_id == user.id, RecoveryCode.used_at.is_(None))
    )).all())


async def check_code(
    session: AsyncSession,
    *,
    user: User,
    code: str,
    keyring: MasterKeys,
    ip: str,
    limit_per_15_minutes: int,
    allow_recovery: bool = True,
    pending: bool = False,
    request_id: str | None = None,
) -> Verified:
    """Check a TOTP code (or, when allowed, a recovery code) of ``user``; refused codes are
    counted, committed and audited before the error is raised. ``pending`` checks the secret of
    an enrolment not yet confirmed."""
    if not pending and not is_enabled(user):
        raise Conflict("Two-step sign-in is not set up.", code="mfa_not_enrolled")
    # Recorded (as failed, committed) before the code is checked: see ``people.begin_attempt``.
    attempt = await people.begin_attempt(session, email=user.email, ip=ip, kind="totp",
                                         limit_per_15_minutes=limit_per_15_minutes)
    secret = secret_of(keyring, user)
    digits = _normal_totp(code)
    actor = Actor("user", user.email)
    failure: ValidationFailed
    if _six_digits(digits):
        step = _matching_step(secret, digits)
        if step is not None:
            if await _take_step(session, user, step):
                people.attempt_succeeded(attempt)
                _reseal_if_old(keyring, user, secret)
                return Verified("totp")
            failure = ValidationFailed(
                "This code was used already. Wait for the next code in your app and enter that one.",
                code="mfa_code_reused",
            )
        else:
            failure = ValidationFailed("The code is not right. Check the time on your device and try again.",
                                       code="mfa_code_invalid")
    elif allow_recovery and len(_normal_recovery(code)) == _RECOVERY_LENGTH:
        if await _spend_recovery_code(session, user, code):
            people.attempt_succeeded(attempt)
            left = await recovery_codes_left(session, user)
            await audit_log.record(session, "mfa.recovery_code_used", actor, tenant_id=user.tenant_id, target=user.email,
                                   request_id=request_id, details={"left": left})
            return Verified("recovery_code", left)
        failure = ValidationFailed("This recovery code is not right or was used already.", code="mfa_code_invalid")
    else:
        failure = ValidationFailed(
            "Enter the 6-digit code from your authenticator app" + (" or a recovery code." if allow_recovery else "."),
            code="mfa_code_invalid",
        )
    await audit_log.record(session, "mfa.verify", actor, outcome="denied", tenant_id=user.tenant_id, target=user.email,
                           request_id=request_id, details={"reason": failure.code})
    # Committed now: the audit record must stay even though the request ends in an error.
    await session.commit()
    raise failure


# ---- enrolment and its life ---------------------------------------------------------------


def _new_recovery_code() -> str:
    raw = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(_RECOVERY_LENGTH))
    return "-".join(raw[i : i + 4] for i in range(0, _RECOVERY_LENGTH, 4))


async def _new_recovery_codes(session: AsyncSession, user: User) -> list[str]:
    await session.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user.id))
    codes = [_new_recovery_code() for _ in range(RECOVERY_CODES)]
    session.add_all(RecoveryCode(user_id=user.id, code_hash=_recovery_hash(user.id, code)) for code in codes)
    await session.flush()
    return codes


def begin_enrolment(*, user: User, keyring: MasterKeys) -> str:
    """A new secret for ``user`` (160 random bits), sealed on the row and waiting for its first code."""
    if is_enabled(user):
        raise Conflict("Two-step sign-in is already on.", code="mfa_already_enabled")
    secret = pyotp.random_base32()
    user.mfa_secret_ct = seal_secret(keyring, user.id, secret)
    user.mfa_last_step = None
    return secret


async def confirm_enrolment(
    session: AsyncSession, *, user: User, code: str, keyring: MasterKeys, ip: str, limit_per_15_minutes: int,
    request_id: str | None = None,
) -> list[str]:
    """The first code from the app turns MFA on; returns the recovery codes (to show once)."""
    if is_enabled(user):
        raise Conflict("Two-step sign-in is already on.", code="mfa_already_enabled")
    if user.mfa_secret_ct is None:
        raise Conflict("Start the set-up first.", code="mfa_not_enrolled")
    await check_code(session, user=user, code=code, keyring=keyring, ip=ip, limit_per_15_minutes=limit_per_15_minutes,
                     allow_recovery=False, pending=True, request_id=request_id)
    user.mfa_enabled_at = datetime.now(UTC)
    codes = await _new_recovery_codes(session, user)
    await sessions.end_all_for_user(session, user.id)
    await audit_log.record(session, "mfa.enrol", Actor("user", user.email), tenant_id=user.tenant_id, target=user.email,
                           request_id=request_id)
    return codes


async def regenerate_recovery_codes(
    session: AsyncSession, *, user: User, code: str, keyring: MasterKeys, ip: str, limit_per_15_minutes: int,
    request_id: str | None = None,
) -> list[str]:
    """New recovery codes (the old ones stop working); needs a current code from the app."""
    await check_code(session, user=user, code=code, keyring=keyring, ip=ip, limit_per_15_minutes=limit_per_15_minutes,
                     allow_recovery=False, request_id=request_id)
    codes = await _new_recovery_codes(session, user)
    await sessions.end_all_for_user(session, user.id)
    await audit_log.record(session, "mfa.recovery_codes", Actor("user", user.email), tenant_id=user.tenant_id,
                           target=user.email, request_id=request_id)
    return codes


def _clear(user: User) -> None:
    user.mfa_secret_ct = None
    user.mfa_enabled_at = None
    user.mfa_last_step = None


async def disable(
    session: AsyncSession, *, user: User, code: str, keyring: MasterKeys, ip: str, limit_per_15_minutes: int,
    required: bool, request_id: str | None = None,
) -> None:
    """The person turns their own MFA off with a current code (or a recovery code); refused for an
    operator where MFA is required."""
    if required and user.role == "operator":
        raise Forbidden("Two-step sign-in is required for operators here; it cannot be turned off.",
                        code="mfa_required")
    await check_code(session, user=user, code=code, keyring=keyring, ip=ip, limit_per_15_minutes=limit_per_15_minutes,
                     request_id=request_id)
    _clear(user)
    await session.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user.id))
    await sessions.end_all_for_user(session, user.id)
    await audit_log.record(session, "mfa.disable", Actor("user", user.email), tenant_id=user.tenant_id,
                           target=user.email, request_id=request_id)


async def cancel_enrolment(user: User) -> None:
    """Drop a secret that was never confirmed (nothing was on, so nothing is audited)."""
    if not is_enabled(user):
        _clear(user)


async def reset(session: AsyncSession, *, user: User, actor: Actor, request_id: str | None = None) -> None:
    """An operator (or the CLI) removes a person's MFA when they lost their device: the secret and
    the recovery codes go, and every session of the person ends. They enrol again after signing in."""
    _clear(user)
    await session.execute(delete(RecoveryCode).where(RecoveryCode.user_id == user.id))
    await sessions.end_all_for_user(session, user.id)
    await audit_log.record(session, "mfa.reset", actor, tenant_id=user.tenant_id, target=user.email,
                           request_id=request_id)


# ---- master key rotation ------------------------------------------------------------------


@dataclass
class KeyReport:
    rewrapped: int = 0
    already_current: int = 0
    opened: int = 0
    failures: list[str] = field(default_factory=list)


async def rewrap_all(db: Database, keyring: MasterKeys) -> KeyReport:
    """Reseal every TOTP secret not under the primary master key (``keys rotate``), so the old
    master key can be removed; each row is rewritten in its own transaction."""
    report = KeyReport()
    async with db.session() as session:
        ids = (await session.scalars(select(User.id).where(User.mfa_secret_ct.is_not(None)))).all()
    for user_id in ids:
        async with db.session() as session:
            user = await session.get(User, user_id)
            if user is None or user.mfa_secret_ct is None:
                continue
            if _parse(user.mfa_secret_ct)[0] == keyring.primary_id:
                report.already_current += 1
                continue
            user.mfa_secret_ct = seal_secret(keyring, user.id, open_secret(keyring, user.id, user.mfa_secret_ct))
            report.rewrapped += 1
    return report


async def verify_all(db: Database, keyring: MasterKeys) -> KeyReport:
    """Open every TOTP secret with the configured keyring (``keys verify``); list what fails."""
    report = KeyReport()
    async with db.session() as session:
        rows = (await session.execute(
            select(User.id, User.email, User.mfa_secret_ct).where(User.mfa_secret_ct.is_not(None)).order_by(User.email)
        )).all()
    for user_id, email, blob in rows:
        try:
            open_secret(keyring, user_id, blob or b"")
            report.opened += 1
        except VaultError as exc:
            report.failures.append(f"mfa secret of {email}: {exc}")
    return report
