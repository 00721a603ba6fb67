"""Salesmsg misbehaving behind the proxy: 5xx, timeouts and dropped connections (emulator faults).

What a caller relies on: a GET is retried when the status says "try again" and Salesmsg's own
answer comes back when the retries run out; a POST (a message send) reaches Salesmsg at most
once; our own errors are documented 5xx with a JSON code, and a 500 of ours never appears.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tests.reliability.support import (
    assert_documented_5xx,
    auth,
    connected_key,
    error_code,
    first_conversation,
    proxy_url,
)

GET = proxy_url("reliable", "conversations?limit=3")
RETRYABLE = (502, 503, 504)


@pytest.fixture
def connected_settings(connected_settings):
    """Salesmsg answers in time unless a test slows it: 3 s is plenty on loopback."""
    return connected_settings.model_copy(update={"salesmsg_timeout_seconds": 3.0})


@pytest.fixture
async def key(runtime, browser, upstream):
    return await connected_key(runtime, browser, upstream, "reliable")


async def _conversation(client, key: str) -> int:
    return await first_conversation(client, key, "reliable")


async def _thread_bodies(client, key: str, conversation: int) -> list[str]:
    response = await client.get(proxy_url("reliable", f"conversations/{conversation}/messages?limit=100"), headers=auth(key))
    assert response.status_code == 200, response.text
    return [m["body"] for m in response.json()]


@pytest.mark.parametrize("status", RETRYABLE)
async def test_a_get_is_retried_through_a_transient_5xx(key, client_for, upstream, status):
    upstream.controls.fail_next(2, status=status, path_prefix="/pub/v2.2/conversations", method="GET", retry_after="0")
    response = await client_for.get(GET, headers=auth(key))
    assert response.status_code == 200 and isinstance(response.json(), list)
    assert upstream.controls.counter("api.GET /conversations") == 3
    assert upstream.controls.counter(f"api.GET /conversations.{status}") == 2


@pytest.mark.parametrize("status", [500, *RETRYABLE])
async def test_a_get_relays_salesmsgs_answer_when_retries_run_out(key, client_for, upstream, status):
    upstream.controls.fail_next(10, status=status, path_prefix="/pub/v2.2/conversations", method="GET", retry_after="0")
    response = await client_for.get(GET, headers=auth(key))
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    assert error_code(response) is None and "message" in response.json()  # Salesmsg's body, not ours
    attempts = 1 if status == 500 else 1 + 2  # a 500 is not retried; the others twice (SMC_PROXY_MAX_RETRIES)
    assert upstream.controls.counter("api.GET /conversations") == attempts
    upstream.controls.reset_faults()
    assert (await client_for.get(GET, headers=auth(key))).status_code == 200


@pytest.mark.parametrize("status", [500, *RETRYABLE])
async def test_a_send_is_never_retried_and_never_doubled(key, client_for, upstream, status):
    conversation = await _conversation(client_for, key)
    url = proxy_url("reliable", f"conversations/{conversation}/send")
    upstream.controls.reset_counters()
    upstream.controls.fail_next(10, status=status, path_prefix=f"/pub/v2.2/conversations/{conversation}/send", retry_after="0")
    text = f"once-{uuid.uuid4().hex[:8]}"
    response = await client_for.post(url, headers=auth(key), json={"message": text})
    assert response.status_code == status and error_code(response) is None
    assert upstream.controls.counter("api.POST /conversations/{id}/send") == 1
    upstream.controls.reset_faults()
    assert text not in await _thread_bodies(client_for, key, conversation)  # a failed send did not happen
    again = await client_for.post(url, headers=auth(key), json={"message": text})
    assert again.status_code == 201
    assert (await _thread_bodies(client_for, key, conversation)).count(text) == 1


async def test_a_slow_salesmsg_is_504_upstream_timeout_after_the_get_retries(key, client_for, upstream):
    upstream.controls.set_latency(3500)  # over the 3 s timeout of this module
    try:
        response = await client_for.get(GET, headers=auth(key), timeout=60)
    finally:
        upstream.controls.set_latency(0)
    assert assert_documented_5xx(response, allowed={504}) == "upstream_timeout"
    assert upstream.controls.counter("api.GET /conversations") == 3
    assert (await client_for.get(GET, headers=auth(key))).status_code == 200


async def test_a_timed_out_send_keeps_its_504_and_is_not_sent_twice(key, client_for, upstream):
    """The outcome of a timed-out send is unknown (Salesmsg may or may not have handled it): the
    504 is kept for its Idempotency-Key, so a retry with the key cannot send the message again."""
    conversation = await _conversation(client_for, key)
    url = proxy_url("reliable", f"conversations/{conversation}/send")
    headers = {**auth(key), "Idempotency-Key": f"slow-{uuid.uuid4().hex}"}
    text = f"slow-{uuid.uuid4().hex[:8]}"
    upstream.controls.set_latency(3500)
    try:
        first = await client_for.post(url, headers=headers, json={"message": text}, timeout=60)
    finally:
        upstream.controls.set_latency(0)
    assert assert_documented_5xx(first, allowed={504}) == "upstream_timeout"
    replay = await client_for.post(url, headers=headers, json={"message": text})
    assert replay.status_code == 504 and replay.headers["idempotent-replayed"] == "true"
    assert upstream.controls.counter("api.POST /conversations/{id}/send") == 1
    assert (await _thread_bodies(client_for, key, conversation)).count(text) <= 1


async def test_dropped_connections_are_retried_for_a_get_then_502(key, client_for, upstream):
    upstream.controls.drop_next(1, path_prefix="/pub/v2.2/conversations", method="GET")
    assert (await client_for.get(GET, headers=auth(key))).status_code == 200
    upstream.controls.drop_next(10, path_prefix="/pub/v2.2/conversations", method="GET")
    response = await client_for.get(GET, headers=auth(key))
    assert assert_documented_5xx(response, allowed={502}) == "upstream_unavailable"
    # three attempts of ours (aiohttp itself may resend an idempotent request on a dropped
    # keep-alive connection, so Salesmsg saw a few more), bounded: drops were left unused
    assert upstream.controls.counter("api.GET /conversations.dropped") - 1 >= 3
    assert upstream.controls.faults()["drop"], "the retries did not stop"
    upstream.controls.reset_faults()
    assert (await client_for.get(GET, headers=auth(key))).status_code == 200


async def test_a_dropped_send_is_502_once_and_its_key_keeps_the_answer(key, client_for, upstream):
    conversation = await _conversation(client_for, key)
    url = proxy_url("reliable", f"conversations/{conversation}/send")
    headers = {**auth(key), "Idempotency-Key": f"drop-{uuid.uuid4().hex}"}
    text = f"dropped-{uuid.uuid4().hex[:8]}"
    upstream.controls.drop_next(5, path_prefix=f"/pub/v2.2/conversations/{conversation}/send")
    first = await client_for.post(url, headers=headers, json={"message": text})
    assert assert_documented_5xx(first, allowed={502}) == "upstream_unavailable"
    assert upstream.controls.counter("api.POST /conversations/{id}/send.dropped") == 1  # not retried
    # Salesmsg may have received it before the connection died: the key keeps the answer
    replay = await client_for.post(url, headers=headers, json={"message": text})
    assert replay.status_code == 502 and replay.headers["idempotent-replayed"] == "true"
    assert upstream.controls.counter("api.POST /conversations/{id}/send.dropped") == 1
    upstream.controls.reset_faults()
    assert text not in await _thread_bodies(client_for, key, conversation)


async def test_429_with_retry_after_as_seconds_or_a_date_is_relayed_and_holds_every_call_that_long(
    key, client_for, upstream, runtime
):
    """Salesmsg's own 429 has no header (its lockout is 60 s); one that something in front of it
    sends with Retry-After, in seconds or as a date, is relayed and locks the org out that long."""
    import email.utils
    import time

    conversation = await _conversation(client_for, key)
    url = proxy_url("reliable", f"conversations/{conversation}/send")
    for retry_after in ("2", email.utils.formatdate(time.time() + 45, usegmt=True)):
        await _until_not_locked_out(runtime, "reliable")
        upstream.controls.fail_next(1, status=429, path_prefix=f"/pub/v2.2/conversations/{conversation}/send",
                                    retry_after=retry_after)
        response = await client_for.post(url, headers=auth(key), json={"message": "rate limited"})
        assert response.status_code == 429 and response.headers["retry-after"] == retry_after
        held = await client_for.post(url, headers=auth(key), json={"message": "rate limited"})
        assert held.status_code == 429 and held.json()["error"]["code"] == "upstream_locked_out"
        assert 1 <= int(held.headers["retry-after"]) <= (2 if retry_after == "2" else 45)
    # the two that reached Salesmsg were its 429s; the held calls were never sent
    assert upstream.controls.counter("api.POST /conversations/{id}/send") == 2
    assert upstream.controls.counter("fault.fail") == 2


async def _until_not_locked_out(runtime, slug: str) -> None:
    from app.connections.store import get_connection
    from app.connections.view import ConnectionView
    from app.tenants import registry

    async with runtime.db.session() as session:
        tenant = await registry.get_tenant(session, slug)
        view = ConnectionView.of(await get_connection(session, tenant.id))
    for _ in range(100):
        state = await runtime.upstream.budget.state(view)
        if state is None or not state.locked_for:
            return
        await asyncio.sleep(min(state.locked_for, 0.5))
    raise AssertionError("the lockout did not end")


async def test_a_send_rate_limited_by_salesmsg_can_be_retried_with_the_same_key(key, client_for, upstream):
    """A 429 means Salesmsg handled nothing and says "later": the key is not spent (it once kept
    the 429 for 24 h, so the retry Retry-After asked for could never send)."""
    conversation = await _conversation(client_for, key)
    url = proxy_url("reliable", f"conversations/{conversation}/send")
    headers = {**auth(key), "Idempotency-Key": f"limited-{uuid.uuid4().hex}"}
    text = f"limited-{uuid.uuid4().hex[:8]}"
    upstream.controls.fail_next(1, status=429, path_prefix=f"/pub/v2.2/conversations/{conversation}/send", retry_after="1")
    first = await client_for.post(url, headers=headers, json={"message": text})
    assert first.status_code == 429 and first.headers["retry-after"] == "1"
    await asyncio.sleep(1.1)  # as Retry-After says
    retry = await client_for.post(url, headers=headers, json={"message": text})  # the same key, as a client retries
    assert retry.status_code == 201, (retry.status_code, retry.text)
    assert (await _thread_bodies(client_for, key, conversation)).count(text) == 1
    assert upstream.controls.counter("api.POST /conversations/{id}/send") == 2  # the 429, then the send
