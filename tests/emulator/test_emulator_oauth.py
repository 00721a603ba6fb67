"""The OAuth2 authorization server: authorize, exchange, refresh, rotation, PKCE, HIPAA."""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from tests.support.emulator_controls import ControlledEmulator

from .support import (
    ACME,
    ALEX,
    ALL_READ,
    AVERY,
    BLAIR,
    CAM,
    CASEY,
    CORNER,
    OTHER_REDIRECT_URI,
    REDIRECT_URI,
    Flow,
    OAuth2Client,
    bearer,
    generate_token,
    is_refused,
    make_config,
    query_of,
)

BAA_MESSAGE = "Access denied. You must have a signed Business Associate Agreement (BAA) to continue."


def _approve_page(emulator: ControlledEmulator, http: httpx.Client, url: str, user_id: int) -> str:
    """Load the approve page of ``url``, pick ``user_id``, press Approve; the callback URL."""
    page = http.get(url)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    answer = Flow(emulator, http).decide(page.text, user_id=user_id)
    assert answer.status_code == 303
    return answer.headers["location"]


def test_authlib_full_cycle_through_the_approve_page(emulator: ControlledEmulator, http: httpx.Client,
                                                     oauth_client: OAuth2Client) -> None:  # fmt: skip
    verifier = generate_token(48)
    url, state = oauth_client.create_authorization_url(emulator.authorize_url, code_verifier=verifier)
    callback = _approve_page(emulator, http, url, CASEY)
    assert query_of(callback)["state"] == state

    token = oauth_client.fetch_token(emulator.token_url, authorization_response=callback, code_verifier=verifier)
    assert token["token_type"] == "Bearer"
    assert token["expires_in"] == 86340
    assert set(token["scope"].split()) >= {"conversations:read", "messages:write"}
    assert token["access_token"].count(".") == 2
    assert len(token["refresh_token"]) >= 43

    me = oauth_client.get(emulator.api_base + "/users/me")
    assert me.status_code == 200 and me.json()["id"] == CASEY
    first = oauth_client.get(emulator.api_base + "/conversations").json()
    # Corner Bakery is the third org: its numbers use the third area code, 415.
    assert first and all(c["contact"]["number"].startswith("+1415555") for c in first)

    old = dict(token)
    new = oauth_client.refresh_token(emulator.token_url)
    assert new["access_token"] != old["access_token"]
    assert new["refresh_token"] != old["refresh_token"]
    assert oauth_client.get(emulator.api_base + "/organization/current").json()["id"] == CORNER
    # The earlier access token is not invalidated by the refresh.
    assert http.get(emulator.api_base + "/users/me", headers=bearer(old["access_token"])).status_code == 200
    assert emulator.controls.counter("token.authorization_code") == 1
    assert emulator.controls.counter("token.refresh") == 1


def test_auto_approve_redirects_straight_back_and_user_id_picks_the_user(http: httpx.Client) -> None:
    with ControlledEmulator(make_config(auto_approve=True)) as server:
        client = OAuth2Client("test-client", "test-secret", scope="users:read", redirect_uri=REDIRECT_URI,
                              trust_env=False)  # fmt: skip
        with client:
            cases = [({}, AVERY), ({"user_id": str(BLAIR)}, BLAIR), ({"login_hint": "cam@corner.example"}, CAM)]
            for extra, expected in cases:
                url, state = client.create_authorization_url(server.authorize_url, **extra)
                answer = http.get(url)
                assert answer.status_code == 302
                callback = answer.headers["location"]
                assert callback.startswith(REDIRECT_URI + "?") and query_of(callback)["state"] == state
                client.fetch_token(server.token_url, authorization_response=callback)
                assert client.get(server.api_base + "/users/me").json()["id"] == expected


def test_deny_redirects_with_access_denied_and_state(flow: Flow) -> None:
    answer = flow.authorize(user_id=AVERY, decision="deny", state="keep-me")
    assert answer.status_code == 303
    assert query_of(answer.headers["location"]) == {"error": "access_denied", "state": "keep-me"}


def test_approve_page_escapes_and_lists_scopes(emulator: ControlledEmulator, http: httpx.Client) -> None:
    page = http.get(emulator.authorize_url, params={
        "response_type": "code", "client_id": "test-client", "redirect_uri": REDIRECT_URI,
        "scope": "contacts:read teams:read", "state": '"><script>alert(1)</script>',
    })  # fmt: skip
    assert page.status_code == 200
    assert "<script>alert" not in page.text
    assert '<select id="user_id" name="user_id">' in page.text
    assert 'name="decision" value="approve"' in page.text and 'name="decision" value="deny"' in page.text
    assert 'data-scope="contacts:read"' in page.text and 'data-scope="teams:read"' in page.text
    assert "Acme Clinic (HIPAA)" in page.text


@pytest.mark.parametrize("params", [
    {"client_id": "nobody", "redirect_uri": REDIRECT_URI},
    {"client_id": "test-client", "redirect_uri": "http://127.0.0.1:9999/callback/evil"},
    {"client_id": "test-client", "redirect_uri": "http://127.0.0.1:9999/callback?x=1"},
    {"client_id": "test-client"},
])  # fmt: skip
def test_unknown_client_or_redirect_uri_shows_an_error_page_never_redirects(
    emulator: ControlledEmulator, http: httpx.Client, params: dict[str, str]
) -> None:
    answer = http.get(emulator.authorize_url, params={"response_type": "code", "scope": "users:read", **params})
    assert answer.status_code == 400
    assert "location" not in answer.headers
    assert answer.headers["content-type"].startswith("text/html")


@pytest.mark.parametrize(("scope", "client_id"), [
    ("users:read bogus:scope", "test-client"),
    ("", "test-client"),
    ("conversations:read", "narrow-client"),
])  # fmt: skip
def test_bad_scope_redirects_with_invalid_scope(emulator: ControlledEmulator, http: httpx.Client, scope: str,
                                                client_id: str) -> None:  # fmt: skip
    answer = http.get(emulator.authorize_url, params={
        "response_type": "code", "client_id": client_id, "redirect_uri": REDIRECT_URI, "scope": scope, "state": "z",
    })  # fmt: skip
    assert answer.status_code == 302
    query = query_of(answer.headers["location"])
    assert query["error"] == "invalid_scope" and query["state"] == "z"


def test_unsupported_response_type(emulator: ControlledEmulator, http: httpx.Client) -> None:
    answer = http.get(emulator.authorize_url, params={
        "response_type": "token", "client_id": "test-client", "redirect_uri": REDIRECT_URI, "scope": "users:read",
    })  # fmt: skip
    assert query_of(answer.headers["location"])["error"] == "unsupported_response_type"


def test_code_is_single_use_and_reuse_revokes_its_tokens(flow: Flow, http: httpx.Client,
                                                         emulator: ControlledEmulator) -> None:  # fmt: skip
    code = flow.code(scope="users:read")
    first = flow.exchange(code)
    assert first.status_code == 200
    again = flow.exchange(code)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    me = http.get(emulator.api_base + "/users/me", headers=bearer(first.json()["access_token"]))
    assert is_refused(me, "Token has been revoked")


def test_code_expires_after_code_ttl(flow: Flow, emulator: ControlledEmulator) -> None:
    code = flow.code(scope="users:read")
    emulator.controls.advance_clock(61)
    answer = flow.exchange(code)
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_grant"


def test_code_is_bound_to_client_and_redirect_uri(flow: Flow) -> None:
    code = flow.code(scope="users:read")
    assert flow.exchange(code, redirect_uri=OTHER_REDIRECT_URI).json()["error"] == "invalid_grant"
    code = flow.code(scope="users:read")
    assert flow.exchange(code, client_id="baa-client").json()["error"] == "invalid_grant"


def test_wrong_client_secret_is_invalid_client_401(flow: Flow) -> None:
    answer = flow.exchange(flow.code(scope="users:read"), client_secret="wrong")
    assert answer.status_code == 401 and answer.json()["error"] == "invalid_client"


def test_pkce_s256_wrong_verifier_fails_and_right_one_works(flow: Flow) -> None:
    verifier = generate_token(48)
    from salesmsg_emulator.tokens import pkce_s256

    challenge = {"code_challenge": pkce_s256(verifier), "code_challenge_method": "S256"}
    wrong = flow.exchange(flow.code(scope="users:read", **challenge), code_verifier=generate_token(48))
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
    missing = flow.exchange(flow.code(scope="users:read", **challenge))
    assert missing.json()["error"] == "invalid_grant"
    right = flow.exchange(flow.code(scope="users:read", **challenge), code_verifier=verifier)
    assert right.status_code == 200


def test_pkce_plain(flow: Flow) -> None:
    verifier = generate_token(50)
    challenge = {"code_challenge": verifier, "code_challenge_method": "plain"}
    assert flow.exchange(flow.code(scope="users:read", **challenge), code_verifier=verifier).status_code == 200


def test_token_request_as_json_and_with_basic_auth(flow: Flow, http: httpx.Client, emulator: ControlledEmulator) -> None:
    code = flow.code(scope="users:read")
    answer = http.post(emulator.token_url, json={
        "grant_type": "authorization_code", "code": code, "client_id": "test-client", "client_secret": "test-secret",
        "redirect_uri": REDIRECT_URI,
    })  # fmt: skip
    assert answer.status_code == 200
    assert answer.headers["cache-control"] == "no-store"
    refresh_token = answer.json()["refresh_token"]
    basic = base64.b64encode(b"test-client:test-secret").decode()
    refreshed = http.post(emulator.token_url, data={"grant_type": "refresh_token", "refresh_token": refresh_token},
                          headers={"Authorization": f"Basic {basic}"})  # fmt: skip
    assert refreshed.status_code == 200 and refreshed.json()["scope"] == "users:read"


def test_documented_refresh_endpoint_json_and_form(flow: Flow, http: httpx.Client, emulator: ControlledEmulator) -> None:
    tokens = flow.tokens(scope="users:read teams:read")
    body = {"grant_type": "refresh_token", "client_id": "test-client", "client_secret": "test-secret",
            "refresh_token": tokens["refresh_token"]}  # fmt: skip
    answer = http.post(emulator.refresh_url, json=body)
    assert answer.status_code == 200
    payload = answer.json()
    assert set(payload) == {"token_type", "expires_in", "access_token", "refresh_token", "scope"}
    form = http.post(emulator.refresh_url, data=body | {"refresh_token": payload["refresh_token"]})
    assert form.status_code == 200
    counters = emulator.controls.counters()
    assert counters["token.refresh"] == 2
    assert counters["token.refresh./oauth/token/refresh"] == 2
    assert counters["token.refresh.200"] == 2


def test_reusing_a_rotated_refresh_token_revokes_the_whole_grant(flow: Flow, http: httpx.Client,
                                                                 emulator: ControlledEmulator) -> None:  # fmt: skip
    tokens = flow.tokens(scope="users:read")
    rotated = flow.refresh(tokens["refresh_token"]).json()
    reuse = flow.refresh(tokens["refresh_token"])
    assert reuse.status_code == 400 and reuse.json()["error"] == "invalid_grant"
    for access in (tokens["access_token"], rotated["access_token"]):
        denied = http.get(emulator.api_base + "/users/me", headers=bearer(access))
        assert is_refused(denied, "Token has been revoked")
    assert flow.refresh(rotated["refresh_token"]).json()["error"] == "invalid_grant"
    assert emulator.controls.counter("grant.reuse_detected") == 1
    assert emulator.controls.grants()[0]["revoked_reason"] == "refresh token reuse"


def test_refresh_may_narrow_scopes_but_never_widen(flow: Flow, http: httpx.Client, emulator: ControlledEmulator) -> None:
    tokens = flow.tokens(scope="users:read teams:read")
    narrow = flow.refresh(tokens["refresh_token"], scope="teams:read").json()
    assert narrow["scope"] == "teams:read"
    assert http.get(emulator.api_base + "/users/me", headers=bearer(narrow["access_token"])).status_code == 403
    wider = flow.refresh(narrow["refresh_token"], scope="teams:read contacts:read")
    assert wider.status_code == 400 and wider.json()["error"] == "invalid_scope"
    # The grant keeps its scopes: the next refresh without scope gets them all back.
    assert flow.refresh(narrow["refresh_token"]).json()["scope"] == "users:read teams:read"


def test_unsupported_and_missing_grant_type(emulator: ControlledEmulator, http: httpx.Client) -> None:
    creds = {"client_id": "test-client", "client_secret": "test-secret"}
    assert http.post(emulator.token_url, data=creds | {"grant_type": "password"}).json()["error"] == (
        "unsupported_grant_type")  # fmt: skip
    assert http.post(emulator.token_url, data=creds).json()["error"] == "invalid_request"
    assert http.post(emulator.refresh_url, json=creds | {"grant_type": "authorization_code"}).json()["error"] == (
        "unsupported_grant_type")  # fmt: skip


def test_hipaa_org_without_baa_gets_the_exact_403(flow: Flow) -> None:
    answer = flow.exchange(flow.code(scope="messages:read", user_id=AVERY))
    assert answer.status_code == 403
    assert answer.json() == {"message": BAA_MESSAGE}


def test_hipaa_org_with_baa_signed_client_succeeds(flow: Flow, http: httpx.Client, emulator: ControlledEmulator) -> None:
    tokens = flow.tokens(client_id="baa-client", scope="messages:read conversations:read", user_id=ALEX)
    conversations = http.get(emulator.api_base + "/conversations", headers=bearer(tokens["access_token"]))
    assert conversations.status_code == 200 and conversations.json()


def test_hipaa_org_non_phi_scopes_and_non_hipaa_org_are_not_gated(flow: Flow) -> None:
    assert flow.exchange(flow.code(scope="teams:read users:read", user_id=AVERY)).status_code == 200
    assert flow.exchange(flow.code(scope="messages:read", user_id=CASEY)).status_code == 200


def test_refresh_is_gated_when_the_baa_goes_away(flow: Flow, emulator: ControlledEmulator) -> None:
    tokens = flow.tokens(client_id="baa-client", scope="messages:read", user_id=AVERY)
    emulator.controls.set_client_baa("baa-client", False)
    answer = flow.refresh(tokens["refresh_token"], client_id="baa-client", client_secret="baa-secret")
    assert answer.status_code == 403 and answer.json() == {"message": BAA_MESSAGE}
    assert emulator.controls.counter("token.refresh.baa_required") == 1


def test_access_token_is_a_signed_jwt_with_the_claims(flow: Flow) -> None:
    tokens = flow.tokens(scope=ALL_READ, user_id=CASEY)
    header, payload, _ = tokens["access_token"].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert json.loads(base64.urlsafe_b64decode(header + "==="))["alg"] == "HS256"
    assert claims["sub"] == str(CASEY) and claims["org"] == CORNER and claims["scope"] == ALL_READ
    assert claims["exp"] - claims["iat"] == 86340 and len(claims["jti"]) == 32


def test_acme_user_sees_only_acme(flow: Flow, http: httpx.Client, emulator: ControlledEmulator) -> None:
    tokens = flow.tokens(client_id="baa-client", scope="organizations:read", user_id=AVERY)
    org = http.get(emulator.api_base + "/organization/current", headers=bearer(tokens["access_token"])).json()
    assert org["id"] == ACME and org["hipaa"] is True
