"""The records the emulator keeps: plain dataclasses of JSON-friendly values.

Times are POSIX seconds (floats) on the emulator's clock; ``payloads``
renders them as ISO 8601. Every record converts to a dict with
``dataclasses.asdict`` and back with ``cls(**data)``, which is all the
SQLite snapshot needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Direction = Literal["inbound", "outbound"]
TokenKind = Literal["oauth", "pat"]


@dataclass
class Org:
    id: int
    name: str
    hipaa: bool
    created_at: float


@dataclass
class User:
    id: int
    org_id: int
    first_name: str
    last_name: str
    email: str
    role: str
    created_at: float


@dataclass
class Client:
    """An OAuth application (copied from the config, BAA flag switchable at run time)."""

    client_id: str
    client_secret: str
    name: str
    redirect_uris: list[str]
    baa_signed: bool
    scopes: list[str] | None


@dataclass
class Team:
    """An inbox: its id is the ``team_id`` a message is sent from."""

    id: int
    org_id: int
    name: str
    number: str
    created_at: float


@dataclass
class Tag:
    id: int
    org_id: int
    name: str
    label: str
    created_at: float


@dataclass
class Contact:
    id: int
    org_id: int
    first_name: str | None
    last_name: str | None
    email: str | None
    number: str
    country: str
    opt_out: bool
    opt_out_at: float | None
    is_blocked: bool
    created_at: float
    updated_at: float
    tag_ids: list[int] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)
    custom_fields: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Conversation:
    id: int
    org_id: int
    contact_id: int
    team_id: int
    owner_id: int | None
    closed_at: float | None
    unread_count: int
    created_at: float
    updated_at: float


@dataclass
class Message:
    """A message; an outbound one carries its planned sent/delivered/failed times.

    ``direction`` is the emulator's own (for filters and statuses): Salesmsg's message
    objects carry no direction, and the API never shows it.

    Its status is derived from those times and the clock when rendered, so a
    message moves queued -> sent -> delivered (or failed) by itself.
    """

    id: int
    org_id: int
    conversation_id: int
    direction: Direction
    type: str
    body: str
    user_id: int | None
    automated: bool
    created_at: float
    received_at: float | None = None
    send_at: float | None = None
    queued_at: float | None = None
    sent_at: float | None = None
    delivered_at: float | None = None
    failed_at: float | None = None
    failed_reason: str | None = None
    media: list[dict[str, Any]] = field(default_factory=list)
    # how it came to be: "api", "app", "automation" for outbound, None for inbound (the emulator's
    # own values: Salesmsg's are not published)
    source: str | None = None
    # a call's recording, ``{"id", "duration", "url"}``; None otherwise
    record: dict[str, Any] | None = None


@dataclass
class Grant:
    """One user's authorization of one client: the family of its tokens."""

    id: str
    client_id: str
    org_id: int
    user_id: int
    scopes: list[str]
    created_at: float
    revoked_at: float | None = None
    revoked_reason: str | None = None


@dataclass
class AccessToken:
    """An issued bearer token; ``jti`` is its key (for a literal PAT from the config, the token itself)."""

    jti: str
    kind: TokenKind
    org_id: int
    user_id: int
    scopes: list[str]
    issued_at: float
    expires_at: float | None
    grant_id: str | None = None
    revoked_at: float | None = None
    # a PAT's lineage: the jti of the first PAT it replaced (None for a PAT never refreshed)
    family: str | None = None


@dataclass
class RefreshToken:
    token: str
    grant_id: str
    client_id: str
    scopes: list[str]
    issued_at: float
    used_at: float | None = None
    revoked_at: float | None = None


@dataclass
class AuthCode:
    code: str
    client_id: str
    redirect_uri: str
    org_id: int
    user_id: int
    scopes: list[str]
    expires_at: float
    code_challenge: str | None = None
    code_challenge_method: str | None = None
    used_at: float | None = None
    grant_id: str | None = None


@dataclass
class PendingAuthorization:
    """An authorize request waiting for the user's decision on the approve page."""

    id: str
    client_id: str
    redirect_uri: str
    scopes: list[str]
    state: str | None
    code_challenge: str | None
    code_challenge_method: str | None
    created_at: float
