"""Salesmsg's scope catalogue and which scopes touch PHI (the rules for them: ``policy``).

Pure: no database, no I/O. The catalogue is Salesmsg's scope table plus ``calls:read`` and
``recordings:read/write``, which its PHI list names though the table does not.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# (resource, label, description of read, description of write or None when read-only)
_RESOURCES: list[tuple[str, str]] = [
    ("contacts", "Contacts"),
    ("conversations", "Conversations"),
    ("messages", "Messages"),
    ("calls", "Calls"),
    ("recordings", "Call recordings"),
    ("attachments", "Attachments"),
    ("saved-replies", "Saved replies"),
    ("teams", "Teams (inboxes)"),
    ("users", "Users"),
    ("tags", "Tags"),
    ("custom-fields", "Custom fields"),
    ("billing", "Billing"),
    ("broadcasts", "Broadcasts"),
    ("broadcasts-recurring", "Recurring broadcasts"),
    ("toll-free", "Toll-free numbers"),
    ("contact-imports", "Contact imports"),
    ("integrations", "Integrations"),
    ("conversions", "Conversions"),
    ("follow-ups", "Follow-ups"),
    ("groups", "Groups"),
    ("keywords", "Keywords"),
    ("numbers", "Numbers"),
    ("numbers-landline", "Landline numbers"),
    ("off-hours", "Off-hours"),
    ("organizations-agency", "Agency organizations"),
    ("organizations", "Organizations"),
    ("organizations-invitations", "Organization invitations"),
    ("role-permissions", "Role permissions"),
    ("triggers", "Triggers"),
    ("opt-in-data-files", "Opt-in data files"),
    ("call-history", "Call history"),
    ("voice", "Voice"),
    ("website-chat", "Website chat"),
]
_READ_ONLY = {"calls"}

# The seed's PHI list, which is stricter than Salesmsg's HIPAA page, and is what we enforce.
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


@dataclass(frozen=True, slots=True)
class Scope:
    name: str
    resource: str
    label: str
    access: str  # "read" | "write"
    phi: bool

    @property
    def description(self) -> str:
        verb = "Read" if self.access == "read" else "Create and update"
        return f"{verb} {self.label.lower()}"


def _build() -> dict[str, Scope]:
    catalogue: dict[str, Scope] = {}
    for resource, label in _RESOURCES:
        for access in ("read", "write"):
            if access == "write" and resource in _READ_ONLY:
                continue
            name = f"{resource}:{access}"
            catalogue[name] = Scope(name, resource, label, access, name in PHI_SCOPES)
    return catalogue


CATALOGUE: dict[str, Scope] = _build()
ALL_SCOPES: frozenset[str] = frozenset(CATALOGUE)
assert PHI_SCOPES <= ALL_SCOPES


def parse(raw: str | Iterable[str] | None) -> list[str]:
    """Split a space- or comma-separated scope string, keeping catalogue order, no duplicates."""
    if raw is None:
        return []
    items = raw.replace(",", " ").split() if isinstance(raw, str) else [s.strip() for s in raw]
    wanted = {s for s in items if s}
    return [name for name in CATALOGUE if name in wanted] + sorted(wanted - ALL_SCOPES)


def format_scopes(scopes: Iterable[str]) -> str:
    """Space-separated, as working Salesmsg clients send them."""
    return " ".join(parse(list(scopes)))


def is_phi(scope: str) -> bool:
    return scope in PHI_SCOPES


@dataclass(frozen=True, slots=True)
class ResourceGroup:
    resource: str
    label: str
    scopes: list[Scope]

    @property
    def phi(self) -> bool:
        return any(s.phi for s in self.scopes)


def grouped() -> list[ResourceGroup]:
    """The catalogue grouped by resource, PHI resources first, for the consent screen."""
    groups: dict[str, ResourceGroup] = {}
    for scope in CATALOGUE.values():
        groups.setdefault(scope.resource, ResourceGroup(scope.resource, scope.label, [])).scopes.append(scope)
    return sorted(groups.values(), key=lambda g: (not g.phi, _RESOURCES.index((g.resource, g.label))))
