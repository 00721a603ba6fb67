"""Token formats: JWT-shaped access tokens (HS256) and opaque secrets.

An access token (OAuth or personal) is ``header.payload.signature``, three
base64url segments, HS256-signed with the emulator's secret. Its payload
carries ``jti`` (the key of the token record in the store), ``sub`` (user
id), ``org`` (org id), ``scope`` (space separated), ``typ`` (``oauth`` or
``pat``), ``iat`` and, when it expires, ``exp``. The record in the store is
the authority: a token whose record is gone, revoked or expired is refused
even when its signature is good.

Refresh tokens, authorization codes and secrets are opaque random strings.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from typing import Any


class TokenDecodeError(ValueError):
    """The string is not a decodable JWT (wrong shape, bad base64, bad JSON)."""


class TokenSignatureError(ValueError):
    """The JWT decodes but its signature is not the emulator's."""


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(segment: str) -> bytes:
    padded = segment + "=" * (-len(segment) % 4)
    try:
        return base64.urlsafe_b64decode(padded.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise TokenDecodeError("Malformed base64 segment") from exc


def _sign(signing_input: bytes, secret: str) -> bytes:
    return hmac.new(secret.encode("utf-8"), signing_input, hashlib.sha256).digest()


def encode_jwt(claims: dict[str, Any], secret: str) -> str:
    """Sign ``claims`` as a compact HS256 JWT."""
    header = _b64encode(json.dumps({"typ": "JWT", "alg": "HS256"}, separators=(",", ":")).encode())
    payload = _b64encode(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    signing_input = f"{header}.{payload}".encode("ascii")
    return f"{header}.{payload}.{_b64encode(_sign(signing_input, secret))}"


def decode_jwt(token: str, secret: str) -> dict[str, Any]:
    """Decode and verify a compact HS256 JWT.

    Raises ``TokenDecodeError`` when the token is not a JWT at all and
    ``TokenSignatureError`` when it is one but not signed by ``secret``.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenDecodeError("Wrong number of segments")
    header_raw, payload_raw, signature_raw = (_b64decode(p) for p in parts)
    try:
        header = json.loads(header_raw)
        payload = json.loads(payload_raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise TokenDecodeError("Syntax error, malformed JSON") from exc
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise TokenDecodeError("Unexpected token structure")
    if header.get("alg") != "HS256":
        raise TokenDecodeError("Algorithm not supported")
    expected = _sign(f"{parts[0]}.{parts[1]}".encode("ascii"), secret)
    if not hmac.compare_digest(expected, signature_raw):
        raise TokenSignatureError("Signature verification failed")
    return payload


def new_secret(nbytes: int = 32) -> str:
    """A random URL-safe string with ``nbytes`` bytes of entropy."""
    return secrets.token_urlsafe(nbytes)


def new_refresh_token() -> str:
    """An opaque refresh token: 48 random bytes, URL-safe (64 characters)."""
    return secrets.token_urlsafe(48)


def new_code() -> str:
    """An opaque authorization code: 32 random bytes, URL-safe."""
    return secrets.token_urlsafe(32)


def new_jti() -> str:
    """A token id: 16 random bytes as hex."""
    return secrets.token_hex(16)


def pkce_s256(verifier: str) -> str:
    """The S256 code challenge of a PKCE code verifier (RFC 7636)."""
    return _b64encode(hashlib.sha256(verifier.encode("ascii")).digest())
