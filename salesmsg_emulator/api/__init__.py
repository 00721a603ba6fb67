"""The Public API under ``/pub/v2.2``: every route, with the scope it requires."""

from __future__ import annotations

from starlette.routing import Route

from salesmsg_emulator.api import account, contacts, conversations


def routes() -> list[Route]:
    return [*conversations.routes(), *contacts.routes(), *account.routes()]
