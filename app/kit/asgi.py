"""Reading a request body before the app does, and handing the app a ``receive`` that replays it.

Used where something must see the body first: our middleware's size limit for bodies sent
without a Content-Length, and the emulator's token endpoints (which classify the grant, and
carry out a refresh whose body arrived even if the client then hangs up, as Salesmsg would).
"""

from __future__ import annotations

from starlette.types import Message, Receive


class BodyTooLarge(Exception):
    """The body went over the limit; what was read of it is dropped."""


async def buffer_body(receive: Receive, *, limit: int | None = None) -> tuple[bytes | None, Receive]:
    """The whole body and a replaying ``receive``; None when the client hung up before the
    body was complete (the app then sees the hang-up, never a truncated body as a whole one)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            ended = message

            async def hung_up() -> Message:
                return ended

            return None, hung_up
        chunk = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            raise BodyTooLarge()
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return body, replay
