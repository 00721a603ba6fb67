"""Reading a request body: ahead of the routes (the token endpoints' counters and hang-ups), and as JSON.

The middleware classifies a token request by its grant type, and carries out a refresh whose
body arrived even if the client then hangs up (as Salesmsg would). ``read_ahead`` returns the
whole body and a ``receive`` that hands it to the route again; a client that hung up before the
body was complete gives None, and the route sees the hang-up, never a truncated body.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Message, Receive


def parse_json(raw: bytes | str) -> Any:
    """``json.loads``, with JSON nested past the parser's depth refused as invalid (ValueError), as
    a server answers 400 rather than failing on it."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None


async def read_ahead(receive: Receive) -> tuple[bytes | None, Receive]:
    parts: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None, _replaying(message, receive)
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(parts), _replaying({"type": "http.request", "body": b"".join(parts), "more_body": False}, receive)


def _replaying(first: Message, receive: Receive) -> Receive:
    """A ``receive`` that answers ``first`` once, then defers to the real one."""
    pending: list[Message] = [first]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay
