"""Which scope a Salesmsg API path needs: a map covering every resource family of the scope table.

By default GET and HEAD need the family's ``:read`` scope, every other method its ``:write``
scope. A few endpoints break that rule and are named in ``_EXPLICIT`` (method and exact path,
``*`` for one id segment), which wins over the families: ``POST /contacts/list`` is a read
(Salesmsg lists contacts with a POST). A path the map does not know is refused (fail closed).
Pure: no I/O.

Adding a Salesmsg endpoint:

- under a family we know with the usual method rule: nothing to do if its first segments match a
  prefix in ``_FAMILIES``; otherwise add ``(prefix, family)`` there (the longest prefix wins, so a
  sub-path can belong to another family: ``tags/contact`` changes a contact, hence ``contacts``);
- a family Salesmsg publishes read-only goes in ``_READ_ONLY_FAMILIES`` too;
- an endpoint whose method does not say what it does (a read sent as POST): a row in ``_EXPLICIT``;
- always a row in ``tests/proxy/test_endpoint_scopes.py``.
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
    # PUT /tags/contact/{contact}/{tag} tags a contact: it changes the contact (PHI), so contacts:write
    ("tags/contact", "contacts"),
    ("contacts/import", "contact-imports"),
    ("contact-imports", "contact-imports"),
    ("contacts", "contacts"),
    ("saved-replies", "saved-replies"),
    ("teams", "teams"),
    ("inboxes", "teams"),
    ("users", "users"),
    ("user", "users"),  # GET /user: the current user
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
# (method, exact path with "*" for one segment) -> scope, where the method rule is wrong.
_EXPLICIT: dict[tuple[str, str], str] = {
    ("POST", "contacts/list"): "contacts:read",  # the current contact listing (GET /contacts is deprecated)
}

_RULES: list[tuple[tuple[str, ...], str]] = sorted(
    ((tuple(prefix.split("/")), family) for prefix, family in _FAMILIES), key=lambda rule: -len(rule[0])
)
_EXPLICIT_RULES: list[tuple[str, tuple[str, ...], str]] = [
    (method, tuple(path.split("/")), scope) for (method, path), scope in _EXPLICIT.items()
]
_ID = re.compile(r"\d+|[0-9a-fA-F-]{16,}|[A-Za-z0-9_-]{20,}")


@dataclass(frozen=True, slots=True)
class Endpoint:
    scope: str
    template: str  # the path with ids replaced, for audit and metrics (no values)

    @property
    def family(self) -> str:
        return self.scope.split(":", 1)[0]

    @property
    def reads(self) -> bool:
        """Only reads (a read-only key may call it), whatever its method."""
        return self.scope.endswith(":read")


def _template(segments: tuple[str, ...]) -> str:
    return "/" + "/".join("{id}" if _ID.fullmatch(s) and not s.isalpha() else s for s in segments)


@lru_cache(maxsize=4096)
def resolve(method: str, path: str) -> Endpoint | None:
    """The scope and template for ``method path`` (path without leading slash), or None."""
    segments = tuple(path.split("/"))
    for explicit_method, pattern, scope in _EXPLICIT_RULES:
        if explicit_method == method and len(pattern) == len(segments) and all(
            p == "*" or p == s for p, s in zip(pattern, segments)
        ):
            return Endpoint(scope, _template(segments))
    access = "read" if method in READ_METHODS else "write"
    for prefix, family in _RULES:
        if len(segments) < len(prefix):
            continue
        if all(p == "*" or p == s for p, s in zip(prefix, segments)):
            if access == "write" and family in _READ_ONLY_FAMILIES:
                return None
            return Endpoint(f"{family}:{access}", _template(segments))
    return None

