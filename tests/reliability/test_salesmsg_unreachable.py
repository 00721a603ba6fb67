"""The network to Salesmsg fails: refused, reset, cut mid-request (the suite's TCP fault proxy).

The app reaches the emulator only through the proxy here, so the tests can refuse new
connections, reset them as they open, or cut the ones in use, as a broken network does.
"""

from __future__ import annotations

import uuid

import pytest

from tests.reliability.support import (
    assert_documented_5xx,
    auth,
    connected_key,
    cut_once_at_salesmsg,
    first_conversation,
    proxy_url,
)
from tests.support.tcp_proxy import TcpFaultProxy

GET = proxy_url("netfail", "conversations?limit=3")


@pytest.fixture
def salesmsg_link(upstream):
    with TcpFaultProxy("127.0.0.1", upstream.port) as link:
        yield link


@pytest.fixture
def connected_settings(connected_settings, salesmsg_link):
    """Every call to Salesmsg (API and token endpoints) goes through the fault proxy."""
    return connected_settings.model_copy(update={
        "salesmsg_api_base": f"http://127.0.0.1:{salesmsg_link.port}/pub/v2.2",
        "salesmsg_timeout_seconds": 5.0,
    })


@pytest.fixture
async def key(runtime, browser, upstream):
    return await connected_key(runtime, browser, upstream, "netfail")


async def _conversation(client, key: str) -> int:
    return await first_conversation(client, key, "netfail")


async def _count_in_thread(client, key: str, conversation: int, text: str) -> int:
    response = await client.get(proxy_url("netfail", f"conversations/{conversation}/messages?limit=100"), headers=auth(key))
    assert response.status_code == 200, response.text
    return [m["body"] for m in response.json()].count(text)


async def test_salesmsg_refusing_connections_is_502_and_a_sends_key_can_be_used_again(key, client_for, upstream, salesmsg_link):
    conversation = await _conversation(client_for, key)
    url = proxy_url("netfail", f"conversations/{conversation}/send")
    headers = {**auth(key), "Idempotency-Key": f"refused-{uuid.uuid4().hex}"}
    text = f"refused-{uuid.uuid4().hex[:8]}"
    upstream.controls.reset_counters()
    salesmsg_link.down()
    try:
        got = await client_for.get(GET, headers=auth(key))
        assert assert_documented_5xx(got, allowed={502}) == "upstream_unavailable"
        sent = await client_for.post(url, headers=headers, json={"message": text})
        assert assert_documented_5xx(sent, allowed={502}) == "upstream_unavailable"
    finally:
        salesmsg_link.up()
    assert upstream.controls.counters().get("api.POST /conversations/{id}/send", 0) == 0
    # Salesmsg never saw the send, so the key was not spent: the client's retry goes through, once
    retry = await client_for.post(url, headers=headers, json={"message": text})
    assert retry.status_code == 201, retry.text
    replay = await client_for.post(url, headers=headers, json={"message": text})
    assert replay.status_code == 201 and replay.json()["id"] == retry.json()["id"]
    assert replay.headers["idempotent-replayed"] == "true"
    assert await _count_in_thread(client_for, key, conversation, text) == 1
    assert (await client_for.get(GET, headers=auth(key))).status_code == 200


async def test_connections_reset_as_they_open_are_502_and_nothing_is_sent(key, client_for, upstream, salesmsg_link):
    conversation = await _conversation(client_for, key)
    url = proxy_url("netfail", f"conversations/{conversation}/send")
    text = f"reset-{uuid.uuid4().hex[:8]}"
    upstream.controls.reset_counters()
    salesmsg_link.reset_new = True
    salesmsg_link.down()  # the pooled keep-alive connections go too
    salesmsg_link.up()
    try:
        got = await client_for.get(GET, headers=auth(key))
        assert assert_documented_5xx(got, allowed={502}) == "upstream_unavailable"
        sent = await client_for.post(url, headers={**auth(key), "Idempotency-Key": f"reset-{uuid.uuid4().hex}"},
                                     json={"message": text})
        assert assert_documented_5xx(sent, allowed={502}) == "upstream_unavailable"
    finally:
        salesmsg_link.reset_new = False
    assert upstream.controls.counters().get("api.POST /conversations/{id}/send", 0) == 0
    assert await _count_in_thread(client_for, key, conversation, text) == 0
    fresh = await client_for.post(url, headers=auth(key), json={"message": text})
    assert fresh.status_code == 201
    assert await _count_in_thread(client_for, key, conversation, text) == 1


async def test_a_connection_cut_while_salesmsg_works_on_a_get_is_502_then_recovers(key, client_for, upstream, salesmsg_link):
    upstream.controls.reset_counters()
    upstream.controls.set_latency(1500)
    try:
        response = await cut_once_at_salesmsg(client_for.get(GET, headers=auth(key), timeout=60), upstream.controls,
                                              "api.GET /conversations", salesmsg_link)
    finally:
        upstream.controls.set_latency(0)
        salesmsg_link.up()
    assert assert_documented_5xx(response, allowed={502}) == "upstream_unavailable"
    assert (await client_for.get(GET, headers=auth(key))).status_code == 200


async def test_a_send_cut_mid_request_is_502_not_retried_and_its_key_keeps_the_answer(key, client_for, upstream, salesmsg_link):
    """Cut after Salesmsg received it: the outcome is unknown to us, so the key keeps the 502."""
    conversation = await _conversation(client_for, key)
    url = proxy_url("netfail", f"conversations/{conversation}/send")
    headers = {**auth(key), "Idempotency-Key": f"cut-{uuid.uuid4().hex}"}
    text = f"cut-{uuid.uuid4().hex[:8]}"
    upstream.controls.reset_counters()
    upstream.controls.set_latency(1500)
    try:
        response = await cut_once_at_salesmsg(client_for.post(url, headers=headers, json={"message": text}, timeout=60),
                                              upstream.controls, "api.POST /conversations/{id}/send", salesmsg_link)
    finally:
        upstream.controls.set_latency(0)
        salesmsg_link.up()
    assert assert_documented_5xx(response, allowed={502}) == "upstream_unavailable"
    replay = await client_for.post(url, headers=headers, json={"message": text})
    assert replay.status_code == 502 and replay.headers["idempotent-replayed"] == "true"
    assert upstream.controls.counter("api.POST /conversations/{id}/send") == 1
    assert await _count_in_thread(client_for, key, conversation, text) <= 1
