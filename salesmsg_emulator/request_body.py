"""Reading a request body before the routes do, for the token endpoints' counters and hang-ups.

The middleware classifies a token request by its grant type, and carries out a refresh whose
body arrived even if the client then hangs up (as Salesmsg would). ``read_ahead`` returns the
whole body and a ``receive`` that hands it to the route again; a client that hung up before the
body was complete gives None, and the route sees the hang-up, never a truncated body.
"""

from __future__ import annotations

from starlette.types import Message, Receive


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
