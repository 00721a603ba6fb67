"""Which scope a Salesmsg API path needs: a map covering every resource family of the scope table.

GET and HEAD need the family's ``:read`` scope, every other method its ``:write`` scope. A path
the map does not know is refused (fail closed). Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

READ_METHODS = frozenset({"GET", "HEAD"})

# (path prefix as segments, scope family). The longest matching prefix wins.
_FAMILIES: list[tuple[str, str]] = [
    ("conversations/*/messages", "messages"),
    ("conversations/*/send", "messages"),
    ("conversations", "conversations"),
    ("messages", "messages"),
    ("contacts/import", "contact-imports"),
    ("contact-imports", "contact-imports"),
    ("contacts", "contacts"),
    ("saved-replies", "saved-replies"),
    ("teams", "teams"),
    ("inboxes", "teams"),
    ("users", "users"),
    ("tags", "tags"),
    ("custom-fields", "custom-fields"),
    ("attachments", "attachments"),
    ("media", "attachments"),
    ("billing", "billing"),
    ("broadcasts/recurring", "broadcasts-recurring"),
    ("broadcasts-recurring", "broadcasts-recurring"),
    ("broadcasts", "broadcasts"),
    ("toll-free", "toll-free"),
    ("integrations", "integrations"),
    ("conversions", "conversions"),
    ("follow-ups", "follow-ups"),
    ("groups", "groups"),
    ("keywords", "keywords"),
    ("numbers/landline", "numbers-landline"),
    ("numbers-landline", "numbers-landline"),
    ("numbers", "numbers"),
    ("off-hours", "off-hours"),
    ("organizations/agency", "organizations-agency"),
    ("organizations-agency", "organizations-agency"),
    ("organizations/invitations", "organizations-invitations"),
    ("organizations-invitations", "organizations-invitations"),
    ("organization/invitations", "organizations-invitations"),
    ("organizations", "organizations"),
    ("organization", "organizations"),
    ("role-permissions", "role-permissions"),
    ("roles", "role-permissions"),
    ("triggers", "triggers"),
    ("opt-in-data-files", "opt-in-data-files"),
    ("call-history", "call-history"),
    ("calls/history", "call-history"),
    ("calls", "calls"),
    ("recordings", "recordings"),
    ("voice", "voice"),
    ("website-chat", "website-chat"),
]
# Families Salesmsg publishes read-only: a write to them is not an endpoint we know.
_READ_ONLY_FAMILIES = frozenset({"calls"})

_RULES: list[tuple[tuple[str, ...], str]] = sorted(
    ((tuple(prefix.split("/")), family) for prefix, family in _FAMILIES), key=lambda rule: -len(rule[0])
)
_ID = re.compile(r"\d+|[0-9a-fA-F-]{16,}|[A-Za-z0-9_-]{20,}")


@dataclass(frozen=True, slots=True)
class Endpoint:
    scope: str
    template: str  # the path with ids replaced, for audit and metrics (no values)

    @property
    def family(self) -> str:
        return self.scope.split(":", 1)[0]


def _template(segments: tuple[str, ...]) -> str:
    return "/" + "/".join("{id}" if _ID.fullmatch(s) and not s.isalpha() else s for s in segments)


@lru_cache(maxsize=4096)
def resolve(method: str, path: str) -> Endpoint | None:
    """The scope and template for ``method path`` (path without leading slash), or None."""
    segments = tuple(path.split("/"))
    access = "read" if method in READ_METHODS else "write"
    for prefix, family in _RULES:
        if len(segments) < len(prefix):
            continue
        if all(p == "*" or p == s for p, s in zip(prefix, segments)):
            if access == "write" and family in _READ_ONLY_FAMILIES:
                return None
            return Endpoint(f"{family}:{access}", _template(segments))
    return None

