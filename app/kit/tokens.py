"""Opaque single-use and bearer tokens: made with 256 random bits, stored only as their SHA-256.

API keys, connect links, invitations, OAuth states and browser session ids all work this way:
the database keeps the hash, so a copy of it lets nobody in.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets


def token_hash(token: str) -> str:
    """The SHA-256 hex digest we store in place of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def hash_matches(stored_hash: str, presented: str) -> bool:
    """Constant-time check of a presented token against its stored hash."""
    return hmac.compare_digest(stored_hash, token_hash(presented))


def new_token(prefix: str = "") -> str:
    """``prefix`` + 256 random bits, URL-safe."""
    return f"{prefix}{secrets.token_urlsafe(32)}"
