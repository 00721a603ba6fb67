"""Bearer authentication, scopes, personal access tokens, rate limiting and HTML errors."""

from __future__ import annotations

import httpx
import pytest

from salesmsg_emulator.scopes import PHI_SCOPES, SCOPES
from tests.support.emulator_controls import ControlledEmulator

from .support import ACME, AVERY, BLAIR, PAT_ACME, PAT_CORNER, Flow, bearer

UNAUTHENTICATED = {"message": "Unauthenticated.", "auth_required": True}


def test_no_token_is_401_unauthorized(emulator: ControlledEmulator, http: httpx.Client) -> None:
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer"}):
        answer = http.get(emulator.api_base + "/conversations", headers=headers)
        assert answer.status_code == 401
        assert answer.json() == {"message": "Unauthorized", "auth_required": False}


@pytest.mark.parametrize("token", ["garbage", "a.b", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.c2ln"])
def test_undecodable_token_is_403(emulator: ControlledEmulator, http: httpx.Client, token: str) -> None:
    answer = http.get(emulator.api_base + "/conversations", headers=bearer(token))
    assert answer.status_code == 403
    body = answer.json()
    assert body["auth_required"] is True and body["message"].startswith("Could not decode token: ")


def test_decodable_but_foreign_expired_or_revoked_token_is_401(flow: Flow, http: httpx.Client,
                                                               emulator: ControlledEmulator) -> None:  # fmt: skip
    tokens = flow.tokens(scope="users:read")
    header, payload, signature = tokens["access_token"].split(".")
    forged = f"{header}.{payload}.{signature[::-1]}"
    assert http.get(emulator.api_base + "/users/me", headers=bearer(forged)).json() == UNAUTHENTICATED
    emulator.controls.advance_clock(86340)
    expired = http.get(emulator.api_base + "/users/me", headers=bearer(tokens["access_token"]))
    assert expired.status_code == 401 and expired.json() == UNAUTHENTICATED
    # A token from before a state reset is unknown: 401 as well.
    emulator.controls.reset_state()
    assert http.get(emulator.api_base + "/users/me", headers=bearer(tokens["access_token"])).status_code == 401


def test_missing_scope_is_403_insufficient_scope(flow: Flow, http: httpx.Client, emulator: ControlledEmulator) -> None:
    tokens = flow.tokens(scope="messages:read teams:read", user_id=AVERY, client_id="baa-client")
    answer = http.get(emulator.api_base + "/conversations", headers=bearer(tokens["access_token"]))
    assert answer.status_code == 403
    body = answer.json()
    assert body["error"] == "insufficient_scope" and body["required_scope"] == "conversations:read"
    assert "conversations:read" in body["message"]
    assert http.get(emulator.api_base + "/teams", headers=bearer(tokens["access_token"])).status_code == 200


@pytest.mark.parametrize(("method", "path", "scope"), [
    ("GET", "/conversations", "conversations:read"),
    ("PUT", "/conversations/{cid}/close", "conversations:write"),
    ("GET", "/conversations/{cid}/messages", "messages:read"),
    ("GET", "/messages/{cid}", "messages:read"),
    ("POST", "/conversations/{cid}/send", "messages:write"),
    ("GET", "/contacts", "contacts:read"),
    ("POST", "/contacts", "contacts:write"),
    ("GET", "/teams", "teams:read"),
    ("GET", "/users/me", "users:read"),
    ("GET", "/organization/current", "organizations:read"),
    ("GET", "/tags", "tags:read"),
    ("POST", "/tags", "tags:write"),
])  # fmt: skip
def test_every_endpoint_requires_its_scope(emulator: ControlledEmulator, http: httpx.Client, method: str, path: str,
                                           scope: str) -> None:  # fmt: skip
    others = [s for s in SCOPES if s != scope]
    token = emulator.controls.issue_pat(AVERY, others)
    answer = http.request(method, emulator.api_base + path.format(cid=1), headers=bearer(token))
    assert answer.status_code == 403 and answer.json()["required_scope"] == scope


def test_scope_catalogue_and_phi_list() -> None:
    assert len(SCOPES) == 62 + 3
    assert {"calls:read", "recordings:read", "recordings:write", "website-chat:write"} <= set(SCOPES)
    assert PHI_SCOPES <= set(SCOPES) and len(PHI_SCOPES) == 11


def test_pats_are_not_hipaa_gated_and_see_their_org(emulator: ControlledEmulator, http: httpx.Client) -> None:
    answer = http.get(emulator.api_base + "/conversations", headers=bearer(PAT_ACME))
    assert answer.status_code == 200 and answer.json()
    assert http.get(emulator.api_base + "/organization/current", headers=bearer(PAT_ACME)).json()["id"] == ACME
    issued = emulator.controls.issue_pat(BLAIR, "messages:read conversations:read")
    assert http.get(emulator.api_base + "/conversations", headers=bearer(issued)).status_code == 200


def test_pat_refresh_replaces_the_token(emulator: ControlledEmulator, http: httpx.Client) -> None:
    answer = http.post(emulator.pat_refresh_url, headers=bearer(PAT_CORNER))
    assert answer.status_code == 200
    body = answer.json()
    assert set(body) == {"token_type", "expires_in", "access_token"}
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    new = body["access_token"]
    assert http.get(emulator.api_base + "/users/me", headers=bearer(PAT_CORNER)).status_code == 401
    assert http.get(emulator.api_base + "/conversations", headers=bearer(new)).status_code == 200  # scopes kept
    emulator.controls.advance_clock(3600)
    assert http.get(emulator.api_base + "/users/me", headers=bearer(new)).status_code == 401
    assert emulator.controls.counter("token.pat_refresh") == 1


def test_pat_refresh_errors(flow: Flow, emulator: ControlledEmulator, http: httpx.Client) -> None:
    assert http.post(emulator.pat_refresh_url).status_code == 401
    assert http.post(emulator.pat_refresh_url, headers=bearer("junk")).status_code == 403
    oauth = flow.tokens(scope="users:read")["access_token"]
    answer = http.post(emulator.pat_refresh_url, headers=bearer(oauth))
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_request"


def test_rate_limit_429_for_a_minute_per_token(emulator: ControlledEmulator, http: httpx.Client) -> None:
    emulator.controls.update_settings(rate_limit_per_minute=5)
    url = emulator.api_base + "/users/me"
    assert [http.get(url, headers=bearer(PAT_ACME)).status_code for _ in range(5)] == [200] * 5
    limited = http.get(url, headers=bearer(PAT_ACME))
    assert limited.status_code == 429 and limited.json() == {"message": "Too Many Attempts."}
    assert not [h for h in limited.headers if h.lower().startswith(("x-ratelimit", "retry-after"))]
    assert http.get(url, headers=bearer(PAT_CORNER)).status_code == 200  # per token
    emulator.controls.advance_clock(59)
    assert http.get(url, headers=bearer(PAT_ACME)).status_code == 429
    emulator.controls.advance_clock(2)
    assert http.get(url, headers=bearer(PAT_ACME)).status_code == 200
    assert emulator.controls.counter("rate_limited") == 2


def test_rate_limit_is_a_rolling_window(emulator: ControlledEmulator, http: httpx.Client) -> None:
    emulator.controls.update_settings(rate_limit_per_minute=3)
    url = emulator.api_base + "/users/me"
    for _ in range(3):
        assert http.get(url, headers=bearer(PAT_ACME)).status_code == 200
        emulator.controls.advance_clock(25)
    # The first request is now 75 s old: the window holds two, so one more is fine.
    assert http.get(url, headers=bearer(PAT_ACME)).status_code == 200
    assert http.get(url, headers=bearer(PAT_ACME)).status_code == 429


def test_html_errors(emulator: ControlledEmulator, http: httpx.Client) -> None:
    emulator.controls.update_settings(html_errors=True)
    for path, headers, status in (("/conversations", {}, 401), ("/conversations/999999", bearer(PAT_ACME), 404),
                                  ("/nowhere", bearer(PAT_ACME), 404)):  # fmt: skip
        answer = http.get(emulator.api_base + path, headers=headers)
        assert answer.status_code == status
        assert answer.headers["content-type"].startswith("text/html")
        assert answer.text.lstrip().startswith("<!DOCTYPE html>")
    # OAuth errors stay JSON; successes stay JSON.
    assert http.post(emulator.token_url, data={"grant_type": "password"}).headers["content-type"] == (
        "application/json")  # fmt: skip
    assert http.get(emulator.api_base + "/teams", headers=bearer(PAT_ACME)).json()


def test_unknown_api_path_is_json_404(emulator: ControlledEmulator, http: httpx.Client) -> None:
    answer = http.get(emulator.api_base + "/nowhere", headers=bearer(PAT_ACME))
    assert answer.status_code == 404 and answer.json() == {"message": "Not Found"}
    assert http.delete(emulator.api_base + "/teams", headers=bearer(PAT_ACME)).status_code == 405
