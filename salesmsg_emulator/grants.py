"""The authorization server's rules, free of HTTP: codes, grants, tokens.

- Codes are single-use, bound to client and redirect_uri, expire after
  ``code_ttl``; a second use of a code revokes the grant it produced.
- Refresh tokens rotate on every use; presenting a used one revokes the whole
  grant (RFC 9700 section 4.14) and fails with ``invalid_grant``.
- A token request for PHI scopes in a HIPAA org from a client without a BAA
  raises ``BaaRequired``. Personal access tokens are never gated.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from salesmsg_emulator.records import (
    AccessToken,
    AuthCode,
    Client,
    Grant,
    PendingAuthorization,
    RefreshToken,
    TokenKind,
)
from salesmsg_emulator.scopes import (
    format_scope,
    parse_scope,
    phi_scopes_in,
    unknown_scopes,
)
from salesmsg_emulator.state import Store
from salesmsg_emulator.tokens import (
    TokenDecodeError,
    TokenSignatureError,
    decode_jwt,
    encode_jwt,
    new_code,
    new_jti,
    new_refresh_token,
    new_secret,
    pkce_s256,
)

PENDING_TTL = 600.0
BAA_MESSAGE = "Access denied. You must have a signed Business Associate Agreement (BAA) to continue."
_VERIFIER = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")


class OAuthError(Exception):
    """An RFC 6749 error: ``{"error": ..., "error_description": ...}``."""

    def __init__(self, error: str, description: str, status: int = 400, *, reuse: bool = False) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status
        self.reuse = reuse


class BaaRequired(Exception):
    """PHI scopes requested for a HIPAA org by a client without a signed BAA."""


AuthFailureKind = Literal["missing", "malformed", "dead"]


class AuthFailure(Exception):
    """A bearer token was ``missing``, ``malformed`` (not a decodable JWT nor a known PAT) or
    ``dead`` (well-formed but badly signed, unknown, expired or revoked); ``reason`` says which.
    How each is answered is the API guard's business (the run-time settings decide)."""

    def __init__(self, kind: AuthFailureKind, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class AuthorizeError(Exception):
    """An authorize request that fails; ``redirect`` False means show a page, never redirect."""

    def __init__(self, error: str, description: str, *, redirect: bool, redirect_uri: str | None = None,
                 state: str | None = None) -> None:  # fmt: skip
        super().__init__(description)
        self.error = error
        self.description = description
        self.redirect = redirect
        self.redirect_uri = redirect_uri
        self.state = state


@dataclass
class TokenSet:
    access_token: str
    expires_in: int
    scopes: list[str]
    refresh_token: str | None = None

    def as_json(self, *, include_scope: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {"token_type": "Bearer", "expires_in": self.expires_in}
        body["access_token"] = self.access_token
        if self.refresh_token is not None:
            body["refresh_token"] = self.refresh_token
        if include_scope:
            body["scope"] = format_scope(self.scopes)
        return body


# --- bearer tokens -------------------------------------------------------------


def token_is_active(store: Store, token: AccessToken) -> bool:
    now = store.now()
    if token.revoked_at is not None or (token.expires_at is not None and token.expires_at <= now):
        return False
    grant = store.grants.get(token.grant_id) if token.grant_id else None
    return grant is None or grant.revoked_at is None


def find_token(store: Store, raw: str) -> AccessToken | None:
    """The record of a bearer string (literal PAT or signed JWT), active or not."""
    record = store.access_tokens.get(raw)
    if record is not None:
        return record
    try:
        claims = decode_jwt(raw, store.secret)
    except (TokenDecodeError, TokenSignatureError):
        return None
    return store.access_tokens.get(str(claims.get("jti")))


def authenticate(store: Store, raw: str | None) -> AccessToken:
    """The active token record for a bearer string, or ``AuthFailure`` saying what is wrong with it."""
    if not raw:
        raise AuthFailure("missing", "No bearer token")
    with store.read():
        record = store.access_tokens.get(raw)
        if record is None:
            try:
                claims = decode_jwt(raw, store.secret)
            except TokenDecodeError as exc:
                raise AuthFailure("malformed", str(exc)) from exc
            except TokenSignatureError as exc:
                raise AuthFailure("dead", str(exc)) from exc
            record = store.access_tokens.get(str(claims.get("jti")))
        if record is None:
            raise AuthFailure("dead", "Unknown token")
        if not token_is_active(store, record):
            expired = record.expires_at is not None and record.expires_at <= store.now()
            raise AuthFailure("dead", "Expired token" if expired else "Token has been revoked")
        return record


def issue_access_token(store: Store, *, kind: TokenKind, org_id: int, user_id: int, scopes: list[str],
                       ttl: float | None, grant_id: str | None = None, family: str | None = None) -> str:  # fmt: skip
    now = store.now()
    jti = new_jti()
    claims: dict[str, Any] = {"jti": jti, "sub": str(user_id), "org": org_id, "scope": format_scope(scopes),
                              "typ": kind, "iat": int(now)}  # fmt: skip
    if ttl is not None:
        claims["exp"] = int(now + ttl)
    store.access_tokens[jti] = AccessToken(
        jti=jti, kind=kind, org_id=org_id, user_id=user_id, scopes=list(scopes), issued_at=now,
        expires_at=now + ttl if ttl is not None else None, grant_id=grant_id, family=family,
    )  # fmt: skip
    return encode_jwt(claims, store.secret)


# --- authorize -----------------------------------------------------------------


def start_authorization(store: Store, params: dict[str, str]) -> PendingAuthorization:
    """Validate an authorize request and remember it until the user decides."""
    client = store.clients.get(params.get("client_id", ""))
    if client is None:
        raise AuthorizeError("invalid_client", "Unknown client_id.", redirect=False)
    redirect_uri = params.get("redirect_uri", "")
    if redirect_uri not in client.redirect_uris:
        raise AuthorizeError("invalid_request", "redirect_uri is missing or not registered for this client.",
                             redirect=False)  # fmt: skip
    state = params.get("state") or None

    def fail(error: str, description: str) -> AuthorizeError:
        return AuthorizeError(error, description, redirect=True, redirect_uri=redirect_uri, state=state)

    if params.get("response_type") != "code":
        raise fail("unsupported_response_type", "Only response_type=code is supported.")
    scopes = parse_scope(params.get("scope"))
    if not scopes:
        raise fail("invalid_scope", "A scope is required.")
    bad = unknown_scopes(scopes) + [s for s in scopes if client.scopes is not None and s not in client.scopes]
    if bad:
        raise fail("invalid_scope", f"Unknown or not allowed scope(s): {' '.join(dict.fromkeys(bad))}.")
    challenge = params.get("code_challenge") or None
    method = params.get("code_challenge_method") or ("plain" if challenge else None)
    if method is not None and (challenge is None or method not in ("S256", "plain")):
        raise fail("invalid_request", "Unsupported or incomplete PKCE parameters.")
    with store.write():
        now = store.now()
        for key in [k for k, p in store.pending.items() if p.created_at + PENDING_TTL <= now]:
            del store.pending[key]
        pending = PendingAuthorization(
            id=new_secret(16), client_id=client.client_id, redirect_uri=redirect_uri, scopes=scopes, state=state,
            code_challenge=challenge, code_challenge_method=method, created_at=now,
        )  # fmt: skip
        store.pending[pending.id] = pending
    return pending


def take_pending(store: Store, request_id: str) -> PendingAuthorization | None:
    """Remove and return a pending authorize request (None when unknown or stale)."""
    with store.write():
        pending = store.pending.pop(request_id, None)
        if pending is None or pending.created_at + PENDING_TTL <= store.now():
            return None
        return pending


def issue_code(store: Store, pending: PendingAuthorization, user_id: int, code_ttl: float) -> str:
    with store.write():
        user = store.users[user_id]
        code = AuthCode(
            code=new_code(), client_id=pending.client_id, redirect_uri=pending.redirect_uri, org_id=user.org_id,
            user_id=user.id, scopes=list(pending.scopes), expires_at=store.now() + code_ttl,
            code_challenge=pending.code_challenge, code_challenge_method=pending.code_challenge_method,
        )  # fmt: skip
        store.codes[code.code] = code
        return code.code


# --- token endpoint ------------------------------------------------------------


def authenticate_client(store: Store, client_id: str | None, client_secret: str | None) -> Client:
    client = store.clients.get(client_id or "")
    if client is None or not client_secret or not hmac.compare_digest(client.client_secret, client_secret):
        raise OAuthError("invalid_client", "Client authentication failed.", 401)
    return client


def _check_baa(store: Store, client: Client, org_id: int, scopes: Iterable[str]) -> None:
    org = store.orgs.get(org_id)
    if org is not None and org.hipaa and not client.baa_signed and phi_scopes_in(scopes):
        raise BaaRequired(BAA_MESSAGE)


def _check_pkce(code: AuthCode, verifier: str | None) -> None:
    if code.code_challenge is None:
        if verifier:
            raise OAuthError("invalid_grant", "code_verifier sent but no code_challenge was in the authorize request.")
        return
    if not verifier or not _VERIFIER.match(verifier):
        raise OAuthError("invalid_grant", "A valid code_verifier is required.")
    expected = pkce_s256(verifier) if code.code_challenge_method == "S256" else verifier
    if not hmac.compare_digest(expected, code.code_challenge):
        raise OAuthError("invalid_grant", "PKCE verification failed.")


def revoke_grant(store: Store, grant: Grant, reason: str) -> None:
    now = store.now()
    if grant.revoked_at is None:
        grant.revoked_at, grant.revoked_reason = now, reason
    for token in store.access_tokens.values():
        if token.grant_id == grant.id and token.revoked_at is None:
            token.revoked_at = now
    for refresh in store.refresh_tokens.values():
        if refresh.grant_id == grant.id and refresh.revoked_at is None:
            refresh.revoked_at = now


def _new_refresh(store: Store, grant: Grant) -> str:
    token = RefreshToken(token=new_refresh_token(), grant_id=grant.id, client_id=grant.client_id,
                         scopes=list(grant.scopes), issued_at=store.now())  # fmt: skip
    store.refresh_tokens[token.token] = token
    return token.token


def exchange_code(store: Store, client: Client, *, code: str | None, redirect_uri: str | None,
                  code_verifier: str | None, access_ttl: int) -> TokenSet:  # fmt: skip
    if not code:
        raise OAuthError("invalid_request", "The code parameter is required.")
    with store.write():
        record = store.codes.get(code)
        if record is None or record.client_id != client.client_id:
            raise OAuthError("invalid_grant", "The authorization code is invalid.")
        if record.used_at is not None:
            if record.grant_id and (grant := store.grants.get(record.grant_id)):
                revoke_grant(store, grant, "authorization code reuse")
            raise OAuthError("invalid_grant", "The authorization code has already been used.")
        if record.expires_at <= store.now():
            raise OAuthError("invalid_grant", "The authorization code has expired.")
        if redirect_uri != record.redirect_uri:
            raise OAuthError("invalid_grant", "redirect_uri does not match the authorize request.")
        _check_pkce(record, code_verifier)
        record.used_at = store.now()
        _check_baa(store, client, record.org_id, record.scopes)
        grant = Grant(id=new_secret(12), client_id=client.client_id, org_id=record.org_id, user_id=record.user_id,
                      scopes=list(record.scopes), created_at=store.now())  # fmt: skip
        store.grants[grant.id] = grant
        record.grant_id = grant.id
        access = issue_access_token(store, kind="oauth", org_id=grant.org_id, user_id=grant.user_id,
                                    scopes=grant.scopes, ttl=access_ttl, grant_id=grant.id)  # fmt: skip
        return TokenSet(access, access_ttl, list(grant.scopes), _new_refresh(store, grant))


def refresh_grant(store: Store, client: Client, *, refresh_token: str | None, scope: str | None,
                  access_ttl: int, rotate: bool = True) -> TokenSet:  # fmt: skip
    """Refresh; ``rotate=False`` (the omit-refresh-token fault) keeps the presented token valid."""
    if not refresh_token:
        raise OAuthError("invalid_request", "The refresh_token parameter is required.")
    with store.write():
        record = store.refresh_tokens.get(refresh_token)
        if record is None or record.client_id != client.client_id:
            raise OAuthError("invalid_grant", "The refresh token is invalid.")
        grant = store.grants[record.grant_id]
        if grant.revoked_at is not None or record.revoked_at is not None:
            raise OAuthError("invalid_grant", "The refresh token has been revoked.")
        if record.used_at is not None:
            revoke_grant(store, grant, "refresh token reuse")
            raise OAuthError("invalid_grant", "The refresh token was already used; the grant is revoked.", reuse=True)
        requested = parse_scope(scope) or list(record.scopes)
        extra = [s for s in requested if s not in record.scopes]
        if extra:
            raise OAuthError("invalid_scope", f"Scope(s) not granted: {' '.join(extra)}.")
        _check_baa(store, client, grant.org_id, requested)
        new_refresh = None
        if rotate:
            record.used_at = store.now()
            new_refresh = _new_refresh(store, grant)
        access = issue_access_token(store, kind="oauth", org_id=grant.org_id, user_id=grant.user_id,
                                    scopes=requested, ttl=access_ttl, grant_id=grant.id)  # fmt: skip
        return TokenSet(access, access_ttl, requested, new_refresh)


def refresh_pat(store: Store, raw: str | None, pat_ttl: int) -> TokenSet:
    """Replace a personal access token by a new one with the same scopes; the old one stops working."""
    with store.write():
        current = authenticate(store, raw)
        if current.kind != "pat":
            raise OAuthError("invalid_request", "Only a personal access token can be refreshed here.")
        current.revoked_at = store.now()
        token = issue_access_token(store, kind="pat", org_id=current.org_id, user_id=current.user_id,
                                   scopes=current.scopes, ttl=pat_ttl,
                                   family=current.family or current.jti)  # fmt: skip
        return TokenSet(token, pat_ttl, list(current.scopes))


def issue_pat(store: Store, user_id: int, scopes: list[str], ttl: float | None) -> TokenSet:
    with store.write():
        user = store.users.get(user_id)
        if user is None:
            raise KeyError(user_id)
        token = issue_access_token(store, kind="pat", org_id=user.org_id, user_id=user.id, scopes=scopes, ttl=ttl)
        return TokenSet(token, int(ttl) if ttl else 0, list(scopes))


# --- selection, for the controls ---------------------------------------------


def select_grants(store: Store, *, org_id: int | None = None, user_id: int | None = None,
                  client_id: str | None = None) -> list[Grant]:  # fmt: skip
    return [
        g for g in store.grants.values()
        if (org_id is None or g.org_id == org_id) and (user_id is None or g.user_id == user_id)
        and (client_id is None or g.client_id == client_id)
    ]  # fmt: skip


def select_tokens(store: Store, *, org_id: int | None = None, user_id: int | None = None,
                  client_id: str | None = None) -> list[AccessToken]:  # fmt: skip
    grant_ids = {g.id for g in select_grants(store, client_id=client_id)} if client_id else None
    return [
        t for t in store.access_tokens.values()
        if (org_id is None or t.org_id == org_id) and (user_id is None or t.user_id == user_id)
        and (grant_ids is None or t.grant_id in grant_ids)
    ]  # fmt: skip
