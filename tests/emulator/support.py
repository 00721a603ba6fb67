"""Shared constants and helpers of the emulator suite (the fixtures are in conftest.py)."""

from __future__ import annotations

import re
import warnings
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from salesmsg_emulator.config import EmulatorConfig
from tests.support.emulator_controls import ControlledEmulator

with warnings.catch_warnings():
    # authlib 1.9 warns that it falls back to httpx when httpx2 is not installed.
    warnings.simplefilter("ignore")
    from authlib.common.security import generate_token
    from authlib.integrations.httpx_client import OAuth2Client

REDIRECT_URI = "http://127.0.0.1:9999/callback"
OTHER_REDIRECT_URI = "http://localhost:9999/callback"
ALL_READ = "conversations:read messages:read contacts:read teams:read users:read organizations:read tags:read"
ALL_SCOPES = ALL_READ + " conversations:write messages:write contacts:write tags:write"
PAT_ACME = "pat-acme-avery-test-000000001"
PAT_CORNER = "pat-corner-casey-test-00000001"

# Orgs and users of the test config.
ACME, BRIGHT, CORNER = 1, 2, 3
AVERY, ALEX, BLAIR, CASEY, CAM = 101, 102, 201, 301, 302


# Every field of a message object, as Salesmsg's v2.3 clients show it (no direction, no team_id).
MESSAGE_FIELDS = {
    "id", "conversation_id", "status", "type", "body", "body_raw", "automated", "user_id", "user", "source",
    "mms_status", "record", "contact", "media", "received_at", "send_at", "queued_at", "sent_at", "delivered_at",
    "failed_at", "failed_reason", "created_at",
}  # fmt: skip


def config_data(**overrides: Any) -> dict[str, Any]:
    """The test configuration as plain data (also written to files by the CLI tests)."""
    data: dict[str, Any] = {
        "clients": [
            {"client_id": "test-client", "client_secret": "test-secret",
             "redirect_uris": [REDIRECT_URI, OTHER_REDIRECT_URI]},
            {"client_id": "baa-client", "client_secret": "baa-secret", "redirect_uris": [REDIRECT_URI],
             "baa_signed": True},
            {"client_id": "narrow-client", "client_secret": "narrow-secret", "redirect_uris": [REDIRECT_URI],
             "scopes": ["teams:read", "users:read"]},
        ],
        "orgs": [
            {"id": ACME, "name": "Acme Clinic", "hipaa": True},
            {"id": BRIGHT, "name": "Bright Dental", "hipaa": True},
            {"id": CORNER, "name": "Corner Bakery", "hipaa": False},
        ],
        "users": [
            {"id": AVERY, "name": "Avery Testwell", "email": "avery@acme.example", "org": ACME},
            {"id": ALEX, "name": "Alex Sampleton", "email": "alex@acme.example", "org": ACME},
            {"id": BLAIR, "name": "Blair Fakeley", "email": "blair@bright.example", "org": BRIGHT},
            {"id": CASEY, "name": "Casey Placeholder", "email": "casey@corner.example", "org": CORNER},
            {"id": CAM, "name": "Cam Mockford", "email": "cam@corner.example", "org": CORNER},
        ],
        "personal_access_tokens": [
            {"token": PAT_ACME, "user": AVERY, "scopes": ALL_SCOPES},
            {"token": PAT_CORNER, "user": CASEY, "scopes": ALL_SCOPES},
        ],
        "controls_enabled": True,
        "rate_limit_per_minute": 0,
        "seed": 7,
    }  # fmt: skip
    data.update(overrides)
    return data


def make_config(**overrides: Any) -> EmulatorConfig:
    return EmulatorConfig.model_validate(config_data(**overrides))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def is_refused(answer: httpx.Response, reason: str | None = None) -> bool:
    """Whether ``answer`` is the default answer to a refused token (malformed, or expired, revoked,
    unknown, badly signed): 403 ``{"message": "Could not decode token: <reason>", "auth_required": true}``."""
    if answer.status_code != 403:
        return False
    body = answer.json()
    prefix = "Could not decode token: "
    return (body.get("auth_required") is True and isinstance(body.get("message"), str)
            and body["message"].startswith(prefix) and (reason is None or body["message"] == prefix + reason))


class Api:
    """A tiny client bound to one bearer token."""

    def __init__(self, server: ControlledEmulator, http: httpx.Client, token: str) -> None:
        self.base, self.http, self.headers = server.api_base, http, bearer(token)

    def request(self, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
        return self.http.request(method, self.base + path, headers=self.headers | (headers or {}), **kwargs)

    def get(self, path: str, **params: Any) -> Any:
        answer = self.request("GET", path, params=params)
        assert answer.status_code == 200, answer.text
        return answer.json()


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


class Flow:
    """Drives the authorize page like a browser would, then hands out codes and tokens."""

    def __init__(self, server: ControlledEmulator, http: httpx.Client) -> None:
        self.server = server
        self.http = http

    def authorize(self, *, client_id: str = "test-client", scope: str = ALL_SCOPES, user_id: int | None = None,
                  redirect_uri: str = REDIRECT_URI, state: str | None = "s-123", decision: str = "approve",
                  **extra: str) -> httpx.Response:  # fmt: skip
        """GET the authorize page, then POST the decision; returns the final redirect response."""
        params = {"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri, "scope": scope,
                  **({"state": state} if state else {}), **extra}  # fmt: skip
        page = self.http.get(self.server.authorize_url, params=params)
        if page.status_code != 200 or "request_id" not in page.text:
            return page
        return self.decide(page.text, user_id=user_id, decision=decision)

    def decide(self, page_html: str, *, user_id: int | None, decision: str = "approve") -> httpx.Response:
        request_id = re.search(r'name="request_id" value="([^"]+)"', page_html)
        assert request_id, page_html
        form = {"request_id": request_id.group(1), "decision": decision}
        if user_id is not None:
            form["user_id"] = str(user_id)
        return self.http.post(self.server.url + "/auth/oauth/decision", data=form)

    def code(self, **kwargs: Any) -> str:
        kwargs.setdefault("user_id", AVERY)
        answer = self.authorize(**kwargs)
        assert answer.status_code == 303, answer.text
        return query_of(answer.headers["location"])["code"]

    def exchange(self, code: str, *, client_id: str = "test-client", client_secret: str | None = None,
                 redirect_uri: str = REDIRECT_URI, **extra: str) -> httpx.Response:  # fmt: skip
        secret = client_secret or {"test-client": "test-secret", "baa-client": "baa-secret",
                                   "narrow-client": "narrow-secret"}[client_id]  # fmt: skip
        return self.http.post(self.server.token_url, data={
            "grant_type": "authorization_code", "code": code, "client_id": client_id, "client_secret": secret,
            "redirect_uri": redirect_uri, **extra,
        })  # fmt: skip

    def tokens(self, **kwargs: Any) -> dict[str, Any]:
        """A full authorize + exchange; the token answer."""
        client_id = kwargs.pop("client_id", "test-client")
        answer = self.exchange(self.code(client_id=client_id, **kwargs), client_id=client_id)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def refresh(self, refresh_token: str, *, client_id: str = "test-client", client_secret: str = "test-secret",
                **extra: str) -> httpx.Response:  # fmt: skip
        return self.http.post(self.server.token_url, data={
            "grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": client_id,
            "client_secret": client_secret, **extra,
        })  # fmt: skip


__all__ = ["OAuth2Client", "generate_token"]
