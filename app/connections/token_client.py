"""Salesmsg's OAuth2 endpoints: authorization URL, code exchange, refresh (OAuth and PAT).

The authorization URL and the code exchange use authlib's async client (on httpx2, which
authlib prefers; PKCE S256; the exchange form-encoded as Salesmsg's own example sends it). Refresh goes through the process's pooled aiohttp
session: Salesmsg documents a JSON refresh body, which authlib cannot send, and authlib's client
keeps per-instance token state that concurrent refreshes of different connections would share.

Every failure is classified: ``dead`` (the grant is gone: reconnect), ``baa_required`` (a 4xx
naming the Business Associate Agreement, as JSON or as an HTML page), ``invalid``, or
``transient`` (5xx, 429, network: retry later).
"""

from __future__ import annotations

import asyncio
import html
import json
import re
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx2
from authlib.common.security import generate_token
from authlib.integrations.httpx_client import AsyncOAuth2Client

from app.core.errors import BAA_REQUIRED_MESSAGE
from app.core.settings import Settings
from app.kit.retry_after import retry_after_seconds

DEAD_ERRORS = frozenset({"invalid_grant", "invalid_client", "unauthorized_client", "access_denied"})


class TokenEndpointError(Exception):
    """A token request failed. ``kind`` is dead, baa_required, invalid or transient."""

    def __init__(
        self, kind: str, *, status: int | None, error: str | None, description: str = "", retry_after: float | None = None
    ) -> None:
        self.kind = kind
        self.status = status
        self.error = error
        self.retry_after = retry_after  # seconds Salesmsg asked us to wait (429/503), if it said
        self.description = description[:200]
        super().__init__(f"{kind}: {error or status} {self.description}".strip())

    @property
    def transient(self) -> bool:
        return self.kind == "transient"

    @property
    def reason(self) -> str:
        """What connection events and ``last_error`` record: the OAuth error, else the status."""
        return self.error or str(self.status)


@dataclass(frozen=True, slots=True)
class TokenResponse:
    access_token: str
    refresh_token: str | None
    expires_in: int | None
    scope: str | None

    @classmethod
    def parse(cls, body: dict[str, Any]) -> "TokenResponse":
        access = body.get("access_token")
        if not isinstance(access, str) or not access:
            raise TokenEndpointError("transient", status=200, error="malformed_response", description="no access_token")
        refresh = body.get("refresh_token")
        expires = body.get("expires_in")
        try:
            expires_in = int(expires) if expires is not None else None
        except (TypeError, ValueError):
            expires_in = None
        scope = body.get("scope")
        return cls(
            access_token=access,
            refresh_token=refresh if isinstance(refresh, str) and refresh else None,
            expires_in=expires_in if expires_in and expires_in > 0 else None,
            scope=" ".join(scope) if isinstance(scope, list) else scope if isinstance(scope, str) else None,
        )


_BAA = re.compile(r"business\s+associate\s+agreement", re.IGNORECASE)
_TAGS = re.compile(r"<[^>]*>")


def _says_baa(parsed: Any, body: bytes) -> bool:
    """Whether the answer is Salesmsg's BAA refusal ("Access denied. You must have a signed
    Business Associate Agreement (BAA) to continue."): in a JSON ``message``, ``error_description``
    or ``error``, or anywhere in the text of a non-JSON (HTML) page."""
    if isinstance(parsed, dict):
        fields = (parsed.get("message"), parsed.get("error_description"), parsed.get("error"))
        return any(isinstance(f, str) and _BAA.search(f) for f in fields)
    if parsed is not None:
        return False
    text = html.unescape(_TAGS.sub(" ", body[:65536].decode("utf-8", "replace")))
    return _BAA.search(text) is not None


def classify(status: int, body: bytes, retry_after: str | None = None) -> TokenEndpointError:
    """Turn a non-2xx answer of a token endpoint into a classified error."""
    parsed: Any = None
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    error = error if isinstance(error, str) else None
    message = parsed.get("message") if isinstance(parsed, dict) else None
    description = (parsed.get("error_description") if isinstance(parsed, dict) else None) or message or ""
    if 400 <= status < 500 and _says_baa(parsed, body):
        return TokenEndpointError("baa_required", status=status, error="baa_required", description=BAA_REQUIRED_MESSAGE)
    if status >= 500 or status == 429 or status == 408:
        return TokenEndpointError("transient", status=status, error=error, description=str(description),
                                  retry_after=retry_after_seconds(retry_after))
    if status == 401 or error in DEAD_ERRORS:
        return TokenEndpointError("dead", status=status, error=error or "unauthorized", description=str(description))
    return TokenEndpointError("invalid", status=status, error=error, description=str(description))


def new_code_verifier() -> str:
    return generate_token(64)


def _oauth_client(settings: Settings) -> AsyncOAuth2Client:
    return AsyncOAuth2Client(
        client_id=settings.salesmsg_client_id,
        client_secret=settings.salesmsg_client_secret,
        token_endpoint_auth_method="client_secret_post",
        redirect_uri=settings.redirect_uri,
        code_challenge_method="S256" if settings.salesmsg_pkce else None,
        timeout=httpx2.Timeout(settings.salesmsg_timeout_seconds, connect=settings.salesmsg_connect_timeout_seconds),
        follow_redirects=False,
    )


def authorization_url(settings: Settings, *, scopes: list[str], state: str, code_verifier: str | None) -> str:
    """Salesmsg's authorize URL: response_type=code, space-separated scopes, state, PKCE S256."""
    client = _oauth_client(settings)
    kwargs: dict[str, Any] = {"state": state, "scope": " ".join(scopes)}
    if code_verifier:
        kwargs["code_verifier"] = code_verifier
    url, _ = client.create_authorization_url(settings.salesmsg_authorize_url, **kwargs)
    return url


async def exchange_code(settings: Settings, *, code: str, code_verifier: str | None) -> TokenResponse:
    """Exchange an authorization code for tokens (authlib, form-encoded, client_secret_post)."""
    captured: dict[str, Any] = {}

    def keep_response(resp: httpx2.Response) -> httpx2.Response:
        captured["status"], captured["body"] = resp.status_code, resp.content
        if resp.status_code != 200:
            raise classify(resp.status_code, resp.content, resp.headers.get("Retry-After"))
        return resp

    async with _oauth_client(settings) as client:
        client.register_compliance_hook("access_token_response", keep_response)
        kwargs: dict[str, Any] = {"code": code, "redirect_uri": settings.redirect_uri, "grant_type": "authorization_code"}
        if code_verifier:
            kwargs["code_verifier"] = code_verifier
        try:
            token = await client.fetch_token(settings.token_url, **kwargs)
        except TokenEndpointError:
            raise
        except httpx2.TimeoutException as exc:
            raise TokenEndpointError("transient", status=None, error="timeout") from exc
        except httpx2.HTTPError as exc:
            raise TokenEndpointError("transient", status=None, error="network") from exc
        except ValueError as exc:  # not JSON (an HTML page)
            raise TokenEndpointError("transient", status=captured.get("status"), error="malformed_response") from exc
        except Exception as exc:  # authlib's OAuthError for an {"error": ...} body on 200
            raise TokenEndpointError("invalid", status=captured.get("status"), error=getattr(exc, "error", "oauth_error")) from exc
    return TokenResponse.parse(dict(token))


async def _post(http: aiohttp.ClientSession, url: str, *, timeout: float, **kwargs: Any) -> TokenResponse:
    try:
        async with http.post(
            url, timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False, auto_decompress=True, **kwargs
        ) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise classify(resp.status, body, resp.headers.get("Retry-After"))
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise TokenEndpointError("transient", status=None, error="timeout" if isinstance(exc, asyncio.TimeoutError) else "network") from exc
    try:
        parsed = json.loads(body)
    except ValueError as exc:
        raise TokenEndpointError("transient", status=200, error="malformed_response") from exc
    if not isinstance(parsed, dict):
        raise TokenEndpointError("transient", status=200, error="malformed_response")
    if "error" in parsed:
        raise classify(400, body)
    return TokenResponse.parse(parsed)


async def refresh_oauth(http: aiohttp.ClientSession, settings: Settings, *, refresh_token: str, timeout: float) -> TokenResponse:
    """Refresh an OAuth grant: JSON at {API base}/oauth/token/refresh, or RFC 6749 form at the token URL."""
    fields = {
        "grant_type": "refresh_token",
        "client_id": settings.salesmsg_client_id,
        "client_secret": settings.salesmsg_client_secret,
        "refresh_token": refresh_token,
    }
    if settings.salesmsg_refresh_style == "salesmsg":
        return await _post(http, settings.refresh_url, timeout=timeout, json=fields, headers={"Accept": "application/json"})
    return await _post(http, settings.token_url, timeout=timeout, data=fields, headers={"Accept": "application/json"})


async def refresh_pat(http: aiohttp.ClientSession, settings: Settings, *, token: str, timeout: float) -> TokenResponse:
    """Refresh a Personal Access Token: the current PAT as bearer, no body."""
    return await _post(
        http,
        settings.pat_refresh_url,
        timeout=timeout,
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
    )


async def get_with_token(
    http: aiohttp.ClientSession, settings: Settings, path: str, *, token: str, timeout: float
) -> tuple[int | None, bytes]:
    """One GET of the Public API with a token outside the proxy (who connected, whether a pasted
    PAT works): the status and body, or (None, b"") when Salesmsg cannot be reached."""
    try:
        async with http.get(
            settings.salesmsg_api_base + path,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout), allow_redirects=False, auto_decompress=True,
        ) as resp:
            return resp.status, await resp.read()
    except (aiohttp.ClientError, TimeoutError, ValueError):  # ValueError: a token no header can carry
        return None, b""
