"""Salesmsg's scope catalogue and which scopes touch PHI (the rules for them: ``policy``).

Pure: no database, no I/O. Two parts:

- ``TABLE_SCOPES``: Salesmsg's scope table, 31 resources with read and write (62 scopes, no
  catch-all). Only these are offered on the consent screen and requested at authorize.
- ``UNLISTED_PHI_SCOPES``: ``calls:read``, ``recordings:read`` and ``recordings:write``, which
  Salesmsg's PHI list names though its table does not. They stay known (``ALL_SCOPES``) and PHI
  wherever a grant holds them (the gate, audit), but asking Salesmsg for a scope it does not know
  may fail the whole authorization, so they are offered only when an operator turns on
  ``SMC_OFFER_UNLISTED_PHI_SCOPES`` (``offered``; ``policy.check_request`` enforces it).

Each scope also says in plain words what it lets the integration do (``Scope.plain``), for the
consent screen: one rule for most resources, a short table where the rule would read badly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Salesmsg's scope table: (resource, label); each has :read and :write.
_RESOURCES: list[tuple[str, str]] = [
    ("contacts", "Contacts"),
    ("conversations", "Conversations"),
    ("messages", "Messages"),
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
# Named by Salesmsg's PHI list, absent from its scope table: (resource, label, accesses).
_UNLISTED: list[tuple[str, str, tuple[str, ...]]] = [
    ("calls", "Calls", ("read",)),
    ("recordings", "Call recordings", ("read", "write")),
]
_ORDER = [resource for resource, _ in _RESOURCES[:3]] + [r for r, _, _ in _UNLISTED] + [r for r, _ in _RESOURCES[3:]]

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
    listed: bool  # in Salesmsg's scope table (False: only its PHI list names it)

    @property
    def description(self) -> str:
        verb = "Read" if self.access == "read" else "Create and update"
        return f"{verb} {self.label.lower()}"

    @property
    def plain(self) -> str:
        """What the scope lets the integration do, in the org admin's words (``plain_words``)."""
        return plain_words(self.resource, self.label, self.access)


# What a scope lets the integration do, for the person on the consent screen. Most follow one
# rule (``plain_words``: "See your tags" / "Create and change your tags"); these say it better
# where the rule would mislead or read oddly: (read, write).
_PLAIN: dict[str, tuple[str, str]] = {
    "conversations": ("Read your conversations", "Change your conversations, such as closing or assigning them"),
    "messages": ("Read your messages", "Send messages on your behalf"),
    "contacts": ("See your contacts", "Add and change your contacts"),
    "attachments": ("See files sent in your messages", "Attach files to messages"),
    "calls": ("See your call log", "Change your call log"),
    "recordings": ("Listen to your call recordings", "Change your call recordings"),
    "teams": ("See your teams (inboxes)", "Create and change your teams (inboxes)"),
    "users": ("See the people in your account", "Add and change the people in your account"),
    "billing": ("See your billing and plan", "Change your billing and plan"),
    "broadcasts": ("See your broadcasts", "Create and send broadcasts"),
    "broadcasts-recurring": ("See your recurring broadcasts", "Create and schedule recurring broadcasts"),
    "toll-free": ("See your toll-free numbers and their verification", "Register and change toll-free numbers"),
    "contact-imports": ("See your contact imports", "Import contacts"),
    "numbers": ("See your phone numbers", "Buy, change and release phone numbers"),
    "organizations": ("See your organization's settings", "Change your organization's settings"),
    "organizations-agency": ("See the organizations your agency manages", "Manage your agency's organizations"),
    "organizations-invitations": ("See invitations to your organization", "Invite people to your organization"),
    "role-permissions": ("See roles and permissions", "Change roles and permissions"),
    "voice": ("See your voice settings", "Change your voice settings"),
    "off-hours": ("See your off-hours schedule", "Change your off-hours schedule"),
    "website-chat": ("See your website chat widget", "Change your website chat widget"),
}


def plain_words(resource: str, label: str, access: str) -> str:
    """The plain-word description of ``resource:access``: from ``_PLAIN``, else the rule."""
    special = _PLAIN.get(resource)
    if special is not None:
        return special[0] if access == "read" else special[1]
    noun = label.lower()
    return f"See your {noun}" if access == "read" else f"Create and change your {noun}"


def _build() -> dict[str, Scope]:
    entries: list[tuple[str, str, tuple[str, ...], bool]] = [(r, label, ("read", "write"), True) for r, label in _RESOURCES]
    entries += [(r, label, accesses, False) for r, label, accesses in _UNLISTED]
    entries.sort(key=lambda e: _ORDER.index(e[0]))
    catalogue: dict[str, Scope] = {}
    for resource, label, accesses, listed in entries:
        for access in accesses:
            name = f"{resource}:{access}"
            catalogue[name] = Scope(name, resource, label, access, name in PHI_SCOPES, listed)
    return catalogue


CATALOGUE: dict[str, Scope] = _build()
ALL_SCOPES: frozenset[str] = frozenset(CATALOGUE)
TABLE_SCOPES: frozenset[str] = frozenset(name for name, s in CATALOGUE.items() if s.listed)
UNLISTED_PHI_SCOPES: frozenset[str] = ALL_SCOPES - TABLE_SCOPES
assert PHI_SCOPES <= ALL_SCOPES and UNLISTED_PHI_SCOPES <= PHI_SCOPES
assert len(TABLE_SCOPES) == 62 and UNLISTED_PHI_SCOPES == {"calls:read", "recordings:read", "recordings:write"}


def offered(*, unlisted: bool) -> frozenset[str]:
    """The scopes one may be offered and ask Salesmsg for: the table, plus the unlisted PHI
    scopes when the operator turned ``SMC_OFFER_UNLISTED_PHI_SCOPES`` on."""
    return ALL_SCOPES if unlisted else TABLE_SCOPES


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


def grouped(*, unlisted: bool = False) -> list[ResourceGroup]:
    """The offered scopes (``offered``) grouped by resource, PHI resources first, for the consent screen."""
    shown = offered(unlisted=unlisted)
    groups: dict[str, ResourceGroup] = {}
    for scope in CATALOGUE.values():
        if scope.name in shown:
            groups.setdefault(scope.resource, ResourceGroup(scope.resource, scope.label, [])).scopes.append(scope)
    return sorted(groups.values(), key=lambda g: (not g.phi, _ORDER.index(g.resource)))
