"""Salesmsg refusing a token we believed valid: one forced refresh, one retry, never a loop.

Salesmsg says so as 401, as 403 "Could not decode token: ..." and, on ``/teams``, as 500
``{"message": null}`` (the emulator's ``invalid_token_answer`` setting plays each; expiring the
token at the emulator makes the one we hold invalid there while we still believe it valid).
A 500 ``{"message": null}`` on a POST forces the refresh but is not retried: a send is never
blindly resent.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import update

from app.core.models import Connection
from tests.support.journeys import PLAIN_ORG, auth, connected_tenant, make_api_key

PROXY = "/api/v1/tenants/corner-bakery/proxy/"
CONVERSATIONS = PROXY + "conversations?limit=5"
SEND = "api.POST /conversations/{id}/send"


@pytest.fixture
async def bakery(runtime, browser):
    return await connected_tenant(runtime, browser, "corner-bakery")


@pytest.fixture
async def key(runtime, bakery):
    return await make_api_key(runtime, tenants=["corner-bakery"])


def invalidate_our_token(upstream, mode: str | None = None) -> None:
    """The token we hold stops working at Salesmsg, which answers as ``mode`` says; counters from zero."""
    if mode is not None:
        upstream.controls.update_settings(invalid_token_answer=mode)
    upstream.controls.expire_tokens(org_id=PLAIN_ORG)
    upstream.controls.reset_counters()


async def first_conversation(client, key: str) -> int:
    response = await client.get(PROXY + "conversations?limit=1", headers=auth(key))
    assert response.status_code == 200, response.text
    return response.json()[0]["id"]


@pytest.mark.parametrize("mode", ["401", "403", "500"])
async def test_a_read_refused_for_its_token_is_refreshed_and_retried_once(bakery, key, client_for, upstream, mode):
    invalidate_our_token(upstream, mode)
    response = await client_for.get(CONVERSATIONS, headers=auth(key))
    assert response.status_code == 200, response.text
    counters = upstream.controls.counters()
    assert counters.get("token.refresh") == 1
    assert counters.get("api.GET /conversations") == 2
    assert counters.get(f"api.GET /conversations.{mode}") == 1 and counters.get("api.GET /conversations.200") == 1


async def test_the_observed_answers_403_decode_and_500_on_teams_both_recover(bakery, key, client_for, upstream):
    invalidate_our_token(upstream)  # the emulator's default: what was observed at Salesmsg
    assert (await client_for.get(CONVERSATIONS, headers=auth(key))).status_code == 200
    assert upstream.controls.counter("api.GET /conversations.403") == 1
    invalidate_our_token(upstream)
    teams = await client_for.get(PROXY + "teams", headers=auth(key))
    assert teams.status_code == 200 and isinstance(teams.json(), list)
    counters = upstream.controls.counters()
    assert counters.get("api.GET /teams.500") == 1 and counters.get("api.GET /teams.200") == 1
    assert counters.get("token.refresh") == 1


@pytest.mark.parametrize("mode", ["401", "403"])
async def test_a_send_refused_for_its_token_is_retried_once_since_it_was_not_accepted(bakery, key, client_for, upstream, mode):
    conversation = await first_conversation(client_for, key)
    invalidate_our_token(upstream, mode)
    sent = await client_for.post(PROXY + f"conversations/{conversation}/send", headers=auth(key), json={"message": "On our way"})
    assert sent.status_code == 201, sent.text
    counters = upstream.controls.counters()
    assert counters.get("token.refresh") == 1
    assert counters.get(SEND) == 2 and counters.get(f"{SEND}.201") == 1


async def test_a_send_answered_500_message_null_refreshes_but_is_never_resent(bakery, key, client_for, upstream):
    conversation = await first_conversation(client_for, key)
    invalidate_our_token(upstream, "500")
    url = PROXY + f"conversations/{conversation}/send"
    first = await client_for.post(url, headers=auth(key), json={"message": "Order ready"})
    assert first.status_code == 500 and first.json() == {"message": None}  # Salesmsg's answer, relayed
    assert upstream.controls.counter(SEND) == 1  # not resent
    assert upstream.controls.counter("token.refresh") == 1  # but the token was refreshed ...
    second = await client_for.post(url, headers=auth(key), json={"message": "Order ready"})
    assert second.status_code == 201  # ... so the caller's own retry goes through
    assert upstream.controls.counter("token.refresh") == 1 and upstream.controls.counter(SEND) == 2


async def test_token_trouble_a_refresh_does_not_cure_is_relayed_after_one_retry(bakery, key, client_for, upstream):
    upstream.controls.reset_counters()
    refused = {"message": "Could not decode token: Syntax error, malformed JSON", "auth_required": True}
    upstream.controls.fail_next(10, status=403, path_prefix="/pub/v2.2/conversations", body=refused)
    answer = await client_for.get(CONVERSATIONS, headers=auth(key))
    assert answer.status_code == 403 and answer.json() == refused
    assert upstream.controls.counter("token.refresh") == 1 and upstream.controls.counter("api.GET /conversations") == 2
    upstream.controls.reset_faults()
    upstream.controls.fail_next(10, status=500, path_prefix="/pub/v2.2/teams", body={"message": None})
    answer = await client_for.get(PROXY + "teams", headers=auth(key))
    assert answer.status_code == 500 and answer.json() == {"message": None}
    assert upstream.controls.counter("token.refresh") == 2 and upstream.controls.counter("api.GET /teams") == 2
    upstream.controls.reset_faults()


async def test_a_500_message_null_right_after_a_refresh_is_taken_for_a_server_error(runtime, bakery, key, client_for, upstream):
    async with runtime.db.session() as session:  # our token is due: this call refreshes it first
        await session.execute(update(Connection).where(Connection.tenant_id == bakery.id)
                              .values(access_expires_at=datetime.now(UTC)))
    upstream.controls.reset_counters()
    upstream.controls.fail_next(1, status=500, path_prefix="/pub/v2.2/teams", body={"message": None})
    answer = await client_for.get(PROXY + "teams", headers=auth(key))
    assert answer.status_code == 500
    assert upstream.controls.counter("token.refresh") == 1 and upstream.controls.counter("api.GET /teams") == 1


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (403, {"message": "This action is unauthorized."}),
        (403, {"error": "insufficient_scope", "message": "The access token does not have the required scope: teams:read."}),
        (403, {"message": "Access denied. You must have a signed Business Associate Agreement (BAA) to continue."}),
        (500, {"message": "Server Error"}),
        (500, "<html><body>Server Error</body></html>"),
    ],
)
async def test_other_refusals_and_server_errors_leave_the_token_alone(bakery, key, client_for, upstream, status, body):
    upstream.controls.reset_counters()
    upstream.controls.fail_next(1, status=status, path_prefix="/pub/v2.2/teams", body=body,
                                content_type=None if isinstance(body, dict) else "text/html")
    answer = await client_for.get(PROXY + "teams", headers=auth(key))
    assert answer.status_code == status
    assert upstream.controls.counter("token.refresh") == 0 and upstream.controls.counter("api.GET /teams") == 1


@pytest.mark.parametrize(
    ("status", "raw", "trouble"),
    [
        (401, b"", "refused"),
        (401, b'{"message":"Unauthenticated.","auth_required":true}', "refused"),
        (403, b'{"message":"Could not decode token: Wrong number of segments","auth_required":true}', "refused"),
        (403, b'{"message":"Unauthenticated."}', "refused"),
        (403, b'{"message":"Unauthenticated"}', "refused"),
        (403, b'{"message":"This action is unauthorized."}', None),
        (403, b'{"error":"insufficient_scope","message":"The access token does not have the required scope: x."}', None),
        (403, b"<html>Could not decode token</html>", None),
        (403, b'["Could not decode token"]', None),
        (500, b'{"message":null}', "server_error"),
        (500, b'{"message":"Server Error"}', None),
        (500, b"", None),
        (502, b'{"message":null}', None),
        (200, b'{"message":null}', None),
    ],
)
def test_what_counts_as_token_trouble(status, raw, trouble):
    from app.proxy.upstream import token_trouble

    assert token_trouble(status, raw) == trouble
