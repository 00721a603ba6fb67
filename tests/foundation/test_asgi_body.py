"""Reading a body before the app: whole bodies replay, a hang-up is never a shorter body."""

from __future__ import annotations

import pytest

from app.kit.asgi import BodyTooLarge, buffer_body


def receiver(*messages):
    queue = list(messages)

    async def receive():
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    return receive


def part(body: bytes, more: bool = True):
    return {"type": "http.request", "body": body, "more_body": more}


async def test_a_chunked_body_is_read_whole_and_replayed_once():
    body, replay = await buffer_body(receiver(part(b"a=1&"), part(b"b=2"), part(b"", more=False)))
    assert body == b"a=1&b=2"
    assert await replay() == {"type": "http.request", "body": b"a=1&b=2", "more_body": False}
    assert (await replay())["type"] == "http.disconnect"  # then whatever the server says next


async def test_a_client_that_hangs_up_mid_body_is_seen_hanging_up():
    body, replay = await buffer_body(receiver(part(b"message=hel"), {"type": "http.disconnect"}))
    assert body is None
    assert (await replay())["type"] == "http.disconnect"  # never "message=hel" as if it were whole


async def test_over_the_limit_is_refused_while_reading():
    with pytest.raises(BodyTooLarge):
        await buffer_body(receiver(part(b"x" * 600), part(b"x" * 600, more=False)), limit=1000)
    body, _ = await buffer_body(receiver(part(b"x" * 1000, more=False)), limit=1000)
    assert body == b"x" * 1000
