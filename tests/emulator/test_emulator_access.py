"""Bearer authentication, scopes, personal access tokens, rate limiting and HTML errors."""

from __future__ import annotations

import httpx
import pytest

from salesmsg_emulator.scopes import PHI_SCOPES, SCOPES
from tests.support.emulator_controls import ControlledEmulator

from .support import (
    ACME,
    ALEX,
    AVERY,
    BLAIR,
    CASEY,
    CORNER,
    PAT_ACME,
    PAT_CORNER,
    Flow,
    bearer,
    is_refused,
    make_config,
)

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


def test_dead_tokens_are_answered_like_malformed_ones_by_default(flow: Flow, http: httpx.Client,
                                                                  emulator: ControlledEmulator) -> None:  # fmt: skip
    tokens = flow.tokens(scope="users:read teams:read")
    header, payload, signature = tokens["access_token"].split(".")
    forged = f"{header}.{payload}.{signature[::-1]}"
    assert is_refused(http.get(emulator.api_base + "/users/me", headers=bearer(forged)), "Signature verification failed")
    assert http.get(emulator.api_base + "/teams", headers=bearer(forged)).json() == {"message": None}
    emulator.controls.advance_clock(86340)
    expired = http.get(emulator.api_base + "/users/me", headers=bearer(tokens["access_token"]))
    assert is_refused(expired, "Expired token")
    counters = emulator.controls.counters()
    assert (counters["auth.dead"], counters["auth.403"], counters["auth.500"]) == (3, 2, 1)
    # A token unknown to the emulator (here: issued before a state reset, so signed with the old secret).
    emulator.controls.reset_state()
    assert is_refused(http.get(emulator.api_base + "/users/me", headers=bearer(tokens["access_token"])))


def test_a_well_signed_but_unknown_token_is_refused(http: httpx.Client) -> None:
    with ControlledEmulator(make_config(token_secret="a-fixed-secret-of-16+")) as server:
        token = server.controls.issue_pat(AVERY, "users:read")
        server.controls.reset_state()  # the secret stays (token_secret), the token record is gone
        assert is_refused(http.get(server.api_base + "/users/me", headers=bearer(token)), "Unknown token")


MALFORMED = "not-a-jwt"
DECODE_ERROR = {"message": "Could not decode token: Wrong number of segments", "auth_required": True}


@pytest.mark.parametrize(("mode", "me", "teams"), [
    ("observed", (403, DECODE_ERROR), (500, {"message": None})),
    ("401", (401, UNAUTHENTICATED), (401, UNAUTHENTICATED)),
    ("403", (403, DECODE_ERROR), (403, DECODE_ERROR)),
    ("500", (500, {"message": None}), (500, {"message": None})),
])  # fmt: skip
def test_invalid_token_answer_modes(emulator: ControlledEmulator, http: httpx.Client, mode: str,
                                    me: tuple[int, dict[str, object]], teams: tuple[int, dict[str, object]]) -> None:  # fmt: skip
    if mode != "observed":
        emulator.controls.update_settings(invalid_token_answer=mode)
    assert emulator.controls.settings()["invalid_token_answer"] == mode
    for path, (status, body) in (("/users/me", me), ("/conversations", me), ("/teams", teams)):
        answer = http.get(emulator.api_base + path, headers=bearer(MALFORMED))
        assert (answer.status_code, answer.json()) == (status, body), path
    # No token stays 401 Unauthorized in every mode.
    assert http.get(emulator.api_base + "/teams").json() == {"message": "Unauthorized", "auth_required": False}


@pytest.mark.parametrize(("invalid_mode", "dead_mode", "status", "body"), [
    ("observed", "as_invalid", 403, {"message": "Could not decode token: Expired token", "auth_required": True}),
    ("401", "as_invalid", 401, UNAUTHENTICATED),
    ("500", "as_invalid", 500, {"message": None}),
    ("observed", "401", 401, UNAUTHENTICATED),
    ("observed", "403", 403, {"message": "Could not decode token: Expired token", "auth_required": True}),
    ("observed", "500", 500, {"message": None}),
])  # fmt: skip
def test_dead_token_answer_modes(emulator: ControlledEmulator, http: httpx.Client, invalid_mode: str, dead_mode: str,
                                 status: int, body: dict[str, object]) -> None:  # fmt: skip
    emulator.controls.update_settings(invalid_token_answer=invalid_mode, dead_token_answer=dead_mode)
    token = emulator.controls.issue_pat(AVERY, "users:read", ttl_seconds=10)
    emulator.controls.advance_clock(11)
    answer = http.get(emulator.api_base + "/users/me", headers=bearer(token))
    assert (answer.status_code, answer.json()) == (status, body)
    malformed = http.get(emulator.api_base + "/users/me", headers=bearer(MALFORMED))
    assert malformed.status_code == {"observed": 403, "401": 401, "500": 500}[invalid_mode]  # unaffected by dead_mode


def test_token_answer_settings_are_validated_and_reset(emulator: ControlledEmulator) -> None:
    for name in ("invalid_token_answer", "dead_token_answer", "rate_limit_scope"):
        with pytest.raises(httpx.HTTPStatusError):
            emulator.controls.update_settings(**{name: "nope"})
    emulator.controls.update_settings(invalid_token_answer="500", dead_token_answer="401", rate_limit_scope="app")
    emulator.controls.reset()
    settings = emulator.controls.settings()
    assert (settings["invalid_token_answer"], settings["dead_token_answer"], settings["rate_limit_scope"]) == (
        "observed", "as_invalid", "org")


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
    assert is_refused(http.get(emulator.api_base + "/users/me", headers=bearer(PAT_CORNER)), "Token has been revoked")
    assert http.get(emulator.api_base + "/conversations", headers=bearer(new)).status_code == 200  # scopes kept
    emulator.controls.advance_clock(3600)
    assert is_refused(http.get(emulator.api_base + "/users/me", headers=bearer(new)), "Expired token")
    assert emulator.controls.counter("token.pat_refresh") == 1


def test_pat_refresh_errors(flow: Flow, emulator: ControlledEmulator, http: httpx.Client) -> None:
    assert http.post(emulator.pat_refresh_url).status_code == 401
    assert http.post(emulator.pat_refresh_url, headers=bearer("junk")).status_code == 403
    oauth = flow.tokens(scope="users:read")["access_token"]
    answer = http.post(emulator.pat_refresh_url, headers=bearer(oauth))
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_request"


def _no_rate_limit_headers(answer: httpx.Response) -> bool:
    return not [h for h in answer.headers if h.lower().startswith(("x-ratelimit", "retry-after", "ratelimit"))]


def test_rate_limit_is_per_org_and_survives_a_refresh(flow: Flow, emulator: ControlledEmulator,
                                                      http: httpx.Client) -> None:  # fmt: skip
    tokens = flow.tokens(scope="users:read", user_id=ALEX)  # the OAuth token and PAT_ACME share org 1
    emulator.controls.update_settings(rate_limit_per_minute=5)
    url = emulator.api_base + "/users/me"
    assert [http.get(url, headers=bearer(PAT_ACME)).status_code for _ in range(3)] == [200] * 3
    assert http.get(url, headers=bearer(tokens["access_token"])).status_code == 200
    refreshed = flow.refresh(tokens["refresh_token"])  # token endpoints are not counted, and reset nothing
    assert refreshed.status_code == 200
    fresh = refreshed.json()["access_token"]
    assert http.get(url, headers=bearer(fresh)).status_code == 200  # the 5th of org 1
    limited = http.get(url, headers=bearer(fresh))
    assert limited.status_code == 429 and limited.json() == {"message": "Too Many Attempts."}
    assert _no_rate_limit_headers(limited)
    assert http.get(url, headers=bearer(PAT_ACME)).status_code == 429  # the whole org
    assert http.get(url, headers=bearer(PAT_CORNER)).status_code == 200  # another org
    emulator.controls.advance_clock(30)
    assert http.get(url, headers=bearer(PAT_ACME)).status_code == 429  # does not extend the lockout
    emulator.controls.advance_clock(29)
    assert http.get(url, headers=bearer(fresh)).status_code == 429
    emulator.controls.advance_clock(2)  # 61 s after the first 429
    assert http.get(url, headers=bearer(fresh)).status_code == 200
    assert emulator.controls.org_usage(ACME) == {"served": 6, "rate_limited": 4}
    assert emulator.controls.org_usage(CORNER) == {"served": 1, "rate_limited": 0}
    assert emulator.controls.counter("rate_limited") == 4
    # Invalid tokens, faults and unknown paths use no budget and are not counted.
    http.get(url, headers=bearer("garbage"))
    http.get(emulator.api_base + "/nowhere", headers=bearer(PAT_ACME))
    assert emulator.controls.org_usage(ACME) == {"served": 6, "rate_limited": 4}
    view = emulator.controls.rate_limits()
    assert view["scope"] == "org" and view["per_minute"] == 5
    assert view["budgets"]["org:1"]["in_window"] == 1 and view["budgets"]["org:1"]["blocked_until"] is None
    assert view["orgs"]["1"] == {"served": 6, "rate_limited": 4}


def test_rate_limit_lockout_can_extend(emulator: ControlledEmulator, http: httpx.Client) -> None:
    emulator.controls.update_settings(rate_limit_per_minute=1, rate_limit_lockout_extends=True)
    url = emulator.api_base + "/users/me"
    assert [http.get(url, headers=bearer(PAT_ACME)).status_code for _ in range(2)] == [200, 429]
    emulator.controls.advance_clock(50)
    assert http.get(url, headers=bearer(PAT_ACME)).status_code == 429  # restarts the 60 s
    emulator.controls.advance_clock(50)
    assert http.get(url, headers=bearer(PAT_ACME)).status_code == 429
    emulator.controls.advance_clock(61)
    assert http.get(url, headers=bearer(PAT_ACME)).status_code == 200


def test_rate_limit_per_app(flow: Flow, emulator: ControlledEmulator, http: httpx.Client) -> None:
    acme = flow.tokens(scope="users:read", user_id=AVERY, client_id="baa-client")
    corner = flow.tokens(scope="users:read", user_id=CASEY, client_id="baa-client")
    other_app = flow.tokens(scope="users:read", user_id=ALEX)  # test-client, same org as acme
    emulator.controls.update_settings(rate_limit_per_minute=3, rate_limit_scope="app")
    url = emulator.api_base + "/users/me"
    assert http.get(url, headers=bearer(acme["access_token"])).status_code == 200
    assert http.get(url, headers=bearer(corner["access_token"])).status_code == 200
    fresh = flow.refresh(corner["refresh_token"], client_id="baa-client", client_secret="baa-secret").json()
    assert http.get(url, headers=bearer(fresh["access_token"])).status_code == 200
    assert http.get(url, headers=bearer(acme["access_token"])).status_code == 429  # one app, two orgs
    assert http.get(url, headers=bearer(other_app["access_token"])).status_code == 200  # another app
    # A PAT counts as its user's own app: not the OAuth apps', and its replacement keeps the count.
    assert [http.get(url, headers=bearer(PAT_CORNER)).status_code for _ in range(2)] == [200, 200]
    new_pat = http.post(emulator.pat_refresh_url, headers=bearer(PAT_CORNER)).json()["access_token"]
    assert [http.get(url, headers=bearer(new_pat)).status_code for _ in range(2)] == [200, 429]
    assert set(emulator.controls.rate_limits()["budgets"]) == {"app:baa-client", "app:test-client", "pat-user:301"}


def test_rate_limit_per_token(flow: Flow, emulator: ControlledEmulator, http: httpx.Client) -> None:
    first = flow.tokens(scope="users:read", user_id=AVERY)
    second = flow.tokens(scope="users:read", user_id=AVERY)  # another authorization, same user and app
    emulator.controls.update_settings(rate_limit_per_minute=2, rate_limit_scope="token")
    url = emulator.api_base + "/users/me"
    assert http.get(url, headers=bearer(first["access_token"])).status_code == 200
    fresh = flow.refresh(first["refresh_token"]).json()["access_token"]
    assert [http.get(url, headers=bearer(fresh)).status_code for _ in range(2)] == [200, 429]  # refresh kept count
    assert http.get(url, headers=bearer(second["access_token"])).status_code == 200
    assert http.get(url, headers=bearer(PAT_ACME)).status_code == 200
    assert http.get(url, headers=bearer(PAT_CORNER)).status_code == 200
    new_pat = http.post(emulator.pat_refresh_url, headers=bearer(PAT_CORNER)).json()["access_token"]
    assert [http.get(url, headers=bearer(new_pat)).status_code for _ in range(2)] == [200, 429]
    assert emulator.controls.org_usage(ACME) == {"served": 4, "rate_limited": 1}


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


def test_the_config_sets_the_unknown_behaviours(http: httpx.Client) -> None:
    chosen = {"rate_limit_scope": "token", "rate_limit_lockout_extends": True, "invalid_token_answer": "401",
              "dead_token_answer": "500", "contacts_list_scope": "contacts:read", "automated_messages_user": True}
    with ControlledEmulator(make_config(**chosen)) as server:
        server.controls.update_settings(invalid_token_answer="observed")
        server.controls.reset()  # back to the config's choices, not the built-in defaults
        assert {k: server.controls.settings()[k] for k in chosen} == chosen
        assert http.get(server.api_base + "/teams", headers=bearer("garbage")).status_code == 401
