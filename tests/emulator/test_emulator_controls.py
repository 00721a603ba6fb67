"""The /_emulator controls: faults, revocation, expiry, PATs, inbound messages, counters, resets."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.support.emulator_controls import ControlledEmulator

from .support import (
    ACME,
    ALEX,
    AVERY,
    CASEY,
    CORNER,
    PAT_ACME,
    Flow,
    bearer,
    is_refused,
    make_config,
)

CONVERSATIONS = "/pub/v2.2/conversations"


def test_fail_next_with_retry_after_then_recovers(emulator: ControlledEmulator, http: httpx.Client) -> None:
    emulator.controls.fail_next(2, status=503, path_prefix=CONVERSATIONS, retry_after=7)
    url = emulator.api_base + "/conversations"
    for _ in range(2):
        failed = http.get(url, headers=bearer(PAT_ACME))
        assert failed.status_code == 503 and failed.headers["retry-after"] == "7"
        assert failed.json() == {"message": "Service Unavailable"}
    assert http.get(emulator.api_base + "/teams", headers=bearer(PAT_ACME)).status_code == 200  # other prefix
    assert http.get(url, headers=bearer(PAT_ACME)).status_code == 200
    counters = emulator.controls.counters()
    assert counters["fault.fail"] == 2
    assert counters["api.GET /conversations"] == 3 and counters["api.GET /conversations.503"] == 2


def test_fail_next_custom_body_and_method(emulator: ControlledEmulator, http: httpx.Client) -> None:
    emulator.controls.fail_next(1, status=502, method="POST", body="<html>Bad gateway</html>",
                                content_type="text/html")  # fmt: skip
    assert http.get(emulator.api_base + "/teams", headers=bearer(PAT_ACME)).status_code == 200
    failed = http.post(emulator.api_base + "/tags", headers=bearer(PAT_ACME), json={"name": "x"})
    assert failed.status_code == 502 and failed.text == "<html>Bad gateway</html>"
    assert failed.headers["content-type"].startswith("text/html")
    emulator.controls.fail_next(1, status=429, body={"message": "Too Many Attempts."})
    assert http.get(emulator.api_base + "/teams", headers=bearer(PAT_ACME)).json() == {"message": "Too Many Attempts."}


def test_fail_next_on_the_token_endpoint_counts_the_refresh_attempt(flow: Flow, emulator: ControlledEmulator) -> None:
    tokens = flow.tokens(scope="users:read")
    emulator.controls.fail_next(1, status=500, path_prefix="/pub/v2.2/oauth/token")
    assert flow.refresh(tokens["refresh_token"]).status_code == 500
    assert flow.refresh(tokens["refresh_token"]).status_code == 200  # the failed attempt rotated nothing
    counters = emulator.controls.counters()
    assert counters["token.refresh"] == 2 and counters["token.refresh.500"] == 1 and counters["token.refresh.200"] == 1


def test_drop_connection_gives_a_transport_error_not_a_status(emulator: ControlledEmulator, http: httpx.Client) -> None:
    emulator.controls.drop_next(1, path_prefix=CONVERSATIONS)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        http.get(emulator.api_base + "/conversations", headers=bearer(PAT_ACME))
    assert http.get(emulator.api_base + "/conversations", headers=bearer(PAT_ACME)).status_code == 200
    counters = emulator.controls.counters()
    assert counters["fault.drop"] == 1 and counters["api.GET /conversations.dropped"] == 1


def test_drop_on_token_endpoint(flow: Flow, emulator: ControlledEmulator) -> None:
    tokens = flow.tokens(scope="users:read")
    emulator.controls.drop_next(1, path_prefix="/pub/v2.2/oauth/token")
    with pytest.raises(httpx.TransportError):
        flow.refresh(tokens["refresh_token"])
    assert flow.refresh(tokens["refresh_token"]).status_code == 200


def test_latency_applies_to_api_calls_only(emulator: ControlledEmulator, http: httpx.Client, flow: Flow) -> None:
    emulator.controls.set_latency(300)
    started = time.perf_counter()
    assert http.get(emulator.api_base + "/teams", headers=bearer(PAT_ACME)).status_code == 200
    assert time.perf_counter() - started >= 0.3
    started = time.perf_counter()
    flow.tokens(scope="users:read")
    assert time.perf_counter() - started < 0.3
    emulator.controls.set_latency(0)
    started = time.perf_counter()
    http.get(emulator.api_base + "/teams", headers=bearer(PAT_ACME))
    assert time.perf_counter() - started < 0.3


def test_slow_token_endpoint_makes_a_client_timeout(flow: Flow, emulator: ControlledEmulator) -> None:
    tokens = flow.tokens(scope="users:read")
    emulator.controls.slow_token(600)
    with pytest.raises(httpx.ReadTimeout):
        flow.http.post(emulator.token_url, timeout=0.2, data={
            "grant_type": "refresh_token", "refresh_token": tokens["refresh_token"],
            "client_id": "test-client", "client_secret": "test-secret",
        })  # fmt: skip
    started = time.perf_counter()
    assert flow.http.get(emulator.api_base + "/teams", headers=bearer(PAT_ACME)).status_code == 200
    assert time.perf_counter() - started < 0.3
    # The abandoned refresh still completes on the server: wait for it so it cannot touch the next test.
    deadline = time.monotonic() + 5
    while emulator.controls.counter("token.refresh.200") == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert emulator.controls.counter("token.refresh.200") == 1


def test_omit_refresh_token_keeps_the_old_one_valid(flow: Flow, emulator: ControlledEmulator) -> None:
    tokens = flow.tokens(scope="users:read")
    emulator.controls.omit_refresh_token(True)
    first = flow.refresh(tokens["refresh_token"]).json()
    assert "refresh_token" not in first and first["access_token"]
    second = flow.refresh(tokens["refresh_token"])  # still valid: no rotation happened
    assert second.status_code == 200
    emulator.controls.omit_refresh_token(False)
    assert "refresh_token" in flow.refresh(tokens["refresh_token"]).json()


@pytest.mark.parametrize("selector", ["org", "user", "token"])
def test_revoke_grant(flow: Flow, emulator: ControlledEmulator, http: httpx.Client, selector: str) -> None:
    tokens = flow.tokens(scope="users:read", user_id=AVERY)
    other = flow.tokens(scope="users:read", user_id=CASEY)
    kwargs = {"org": {"org_id": ACME}, "user": {"user_id": AVERY},
              "token": {"access_token": tokens["access_token"]}}[selector]  # fmt: skip
    assert emulator.controls.revoke(**kwargs)["revoked_grants"] == 1
    assert is_refused(http.get(emulator.api_base + "/users/me", headers=bearer(tokens["access_token"])),
                      "Token has been revoked")
    assert flow.refresh(tokens["refresh_token"]).json()["error"] == "invalid_grant"
    assert http.get(emulator.api_base + "/users/me", headers=bearer(other["access_token"])).status_code == 200


def test_revoke_a_pat(emulator: ControlledEmulator, http: httpx.Client) -> None:
    assert emulator.controls.revoke(access_token=PAT_ACME)["revoked_pats"] == 1
    assert is_refused(http.get(emulator.api_base + "/users/me", headers=bearer(PAT_ACME)), "Token has been revoked")


def test_expire_token_then_refresh_works(flow: Flow, emulator: ControlledEmulator, http: httpx.Client) -> None:
    tokens = flow.tokens(scope="users:read", user_id=ALEX)
    assert emulator.controls.expire_tokens(access_token=tokens["access_token"]) == 1
    expired = http.get(emulator.api_base + "/users/me", headers=bearer(tokens["access_token"]))
    assert is_refused(expired, "Expired token")
    fresh = flow.refresh(tokens["refresh_token"]).json()["access_token"]
    assert http.get(emulator.api_base + "/users/me", headers=bearer(fresh)).status_code == 200
    assert emulator.controls.expire_tokens(org_id=ACME) >= 2  # the PAT of the org too
    assert is_refused(http.get(emulator.api_base + "/users/me", headers=bearer(fresh)))


def test_issue_pat_with_ttl(emulator: ControlledEmulator, http: httpx.Client) -> None:
    token = emulator.controls.issue_pat(CASEY, ["users:read"], ttl_seconds=30)
    assert http.get(emulator.api_base + "/users/me", headers=bearer(token)).json()["id"] == CASEY
    emulator.controls.advance_clock(31)
    assert is_refused(http.get(emulator.api_base + "/users/me", headers=bearer(token)), "Expired token")
    with pytest.raises(httpx.HTTPStatusError):
        emulator.controls.issue_pat(999, ["users:read"])
    with pytest.raises(httpx.HTTPStatusError):
        emulator.controls.issue_pat(CASEY, ["nope:read"])


def test_inject_inbound_message_is_returned_raw(emulator: ControlledEmulator, http: httpx.Client) -> None:
    conversations = http.get(emulator.api_base + "/conversations", headers=bearer(PAT_ACME),
                             params={"filter": "closed"}).json()  # fmt: skip
    cid = conversations[0]["id"]
    payload = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    injected = emulator.controls.inject_inbound(cid, payload)
    assert injected["status"] == "received" and injected["body"] == payload
    conversation = http.get(emulator.api_base + f"/conversations/{cid}", headers=bearer(PAT_ACME)).json()
    assert conversation["latest_message"]["body"] == payload and conversation["latest_message"]["body_raw"] == payload
    assert conversation["unread"] is True and conversation["closed_at"] is None


def test_counters_and_resets(emulator: ControlledEmulator, http: httpx.Client) -> None:
    http.get(emulator.api_base + "/teams", headers=bearer(PAT_ACME))
    http.get(emulator.api_base + "/teams")
    counters = emulator.controls.counters()
    assert counters["api.GET /teams"] == 2 and counters["api.GET /teams.200"] == 1
    assert counters["api.GET /teams.401"] == 1
    emulator.controls.set_latency(10)
    emulator.controls.fail_next(5)
    emulator.controls.update_settings(rate_limit_per_minute=1)
    emulator.controls.reset()
    assert emulator.controls.counters() == {}
    assert emulator.controls.faults() == {"latency_ms": 0, "token_delay_ms": 0, "omit_refresh_token": False,
                                          "fail": [], "drop": []}  # fmt: skip
    assert emulator.controls.settings()["rate_limit_per_minute"] == 0


def test_state_reset_restores_the_seed(emulator: ControlledEmulator, http: httpx.Client) -> None:
    contact = http.get(emulator.api_base + "/contacts", headers=bearer(PAT_ACME)).json()["data"][0]
    assert http.delete(emulator.api_base + f"/contacts/{contact['id']}", headers=bearer(PAT_ACME)).status_code == 200
    emulator.controls.advance_clock(1000)
    emulator.controls.reset_state()
    assert http.get(emulator.api_base + f"/contacts/{contact['id']}", headers=bearer(PAT_ACME)).json() == contact
    assert emulator.controls.clock()["offset"] == 0


def test_settings_validation(emulator: ControlledEmulator) -> None:
    with pytest.raises(httpx.HTTPStatusError):
        emulator.controls.update_settings(no_such_setting=1)
    with pytest.raises(httpx.HTTPStatusError):
        emulator.controls.update_settings(html_errors="yes")
    assert emulator.controls.update_settings(code_ttl=5)["code_ttl"] == 5


def test_org_hipaa_switch(flow: Flow, emulator: ControlledEmulator) -> None:
    emulator.controls.set_org_hipaa(CORNER, True)
    assert flow.exchange(flow.code(scope="messages:read", user_id=CASEY)).status_code == 403
    emulator.controls.set_org_hipaa(CORNER, False)
    assert flow.exchange(flow.code(scope="messages:read", user_id=CASEY)).status_code == 200


def test_orgs_and_grants_views(flow: Flow, emulator: ControlledEmulator) -> None:
    orgs = emulator.controls.orgs()
    assert [o["name"] for o in orgs] == ["Acme Clinic", "Bright Dental", "Corner Bakery"]
    assert [u["id"] for u in orgs[0]["users"]] == [AVERY, ALEX] and len(orgs[0]["teams"]) == 3
    tokens = flow.tokens(scope="users:read", user_id=CASEY)
    flow.refresh(tokens["refresh_token"])
    (grant,) = emulator.controls.grants(org_id=CORNER)
    assert grant["user_id"] == CASEY and grant["refresh_count"] == 1 and grant["revoked"] is False


def test_controls_disabled_answer_404_but_health(http: httpx.Client) -> None:
    with ControlledEmulator(make_config(controls_enabled=False)) as server:
        assert http.get(server.url + "/_emulator/health").json()["status"] == "ok"
        for path in ("/_emulator/counters", "/_emulator/faults", "/_emulator/nothing"):
            assert http.get(server.url + path).status_code == 404
        assert http.post(server.url + "/_emulator/faults/fail", json={}).status_code == 404


def test_control_client_is_usable_from_another_thread(emulator: ControlledEmulator, http: httpx.Client) -> None:
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(10):
                emulator.controls.counters()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for thread in threads:
        thread.start()
    for _ in range(10):
        assert http.get(emulator.api_base + "/teams", headers=bearer(PAT_ACME)).status_code == 200
    for thread in threads:
        thread.join()
    assert not errors
    assert emulator.controls.counter("api.GET /teams") == 10
