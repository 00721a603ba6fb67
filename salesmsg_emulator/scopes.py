"""The scope catalogue of the Salesmsg Public API, as the emulator enforces it.

Every scope of Salesmsg's published scope table, plus ``calls:read``,
``recordings:read`` and ``recordings:write`` which the HIPAA section names
but the table omits. ``PHI_SCOPES`` is the HIPAA list: a token request for
one of them, for a HIPAA org, from an OAuth client without a signed BAA, is
refused with HTTP 403.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_TABLE: tuple[tuple[str, str], ...] = (
    ("contacts", "contacts"),
    ("conversations", "conversations"),
    ("messages", "messages"),
    ("saved-replies", "saved replies"),
    ("teams", "teams"),
    ("users", "users"),
    ("tags", "tags"),
    ("custom-fields", "custom fields"),
    ("attachments", "attachments"),
    ("billing", "billing"),
    ("broadcasts", "broadcasts"),
    ("broadcasts-recurring", "recurring broadcasts"),
    ("toll-free", "toll-free numbers"),
    ("contact-imports", "contact imports"),
    ("integrations", "integrations"),
    ("conversions", "conversions"),
    ("follow-ups", "follow-ups"),
    ("groups", "groups"),
    ("keywords", "keywords"),
    ("numbers", "numbers"),
    ("numbers-landline", "landline numbers"),
    ("off-hours", "off-hours"),
    ("organizations-agency", "agency organizations"),
    ("organizations", "organizations"),
    ("organizations-invitations", "organization invitations"),
    ("role-permissions", "role permissions"),
    ("triggers", "triggers"),
    ("opt-in-data-files", "opt-in data files"),
    ("call-history", "call history"),
    ("voice", "voice"),
    ("website-chat", "website chat"),
)


def _catalogue() -> dict[str, str]:
    scopes: dict[str, str] = {}
    for resource, label in _TABLE:
        scopes[f"{resource}:read"] = f"Read {label} via Public API."
        scopes[f"{resource}:write"] = f"Create and update {label} via Public API."
    scopes["calls:read"] = "Read calls via Public API."
    scopes["recordings:read"] = "Read call recordings via Public API."
    scopes["recordings:write"] = "Create and update call recordings via Public API."
    return scopes


SCOPES: dict[str, str] = _catalogue()
"""Every scope the emulator knows, with its description."""

PHI_SCOPES: frozenset[str] = frozenset(
    {
        "conversations:read",
        "conversations:write",
        "messages:read",
        "messages:write",
        "calls:read",
        "recordings:read",
        "recordings:write",
        "contacts:read",
        "contacts:write",
        "attachments:read",
        "attachments:write",
    }
)
"""Scopes that reach Protected Health Information (the HIPAA list)."""

_SEPARATORS = re.compile(r"[\s,]+")


def parse_scope(value: str | Iterable[str] | None) -> list[str]:
    """Split a scope parameter into scopes, keeping the first occurrence order.

    Space is the separator clients send; commas are accepted too (be liberal
    in what the emulator accepts).
    """
    if value is None:
        return []
    if isinstance(value, str):
        parts = _SEPARATORS.split(value)
    else:
        parts = [p for item in value for p in _SEPARATORS.split(str(item))]
    seen: dict[str, None] = {}
    for part in parts:
        if part:
            seen.setdefault(part, None)
    return list(seen)


def unknown_scopes(scopes: Iterable[str]) -> list[str]:
    """The scopes that are not in the catalogue."""
    return [s for s in scopes if s not in SCOPES]


def phi_scopes_in(scopes: Iterable[str]) -> list[str]:
    """The PHI scopes among ``scopes``."""
    return [s for s in scopes if s in PHI_SCOPES]


def format_scope(scopes: Iterable[str]) -> str:
    """Scopes as the space-separated string of a token response."""
    return " ".join(scopes)
