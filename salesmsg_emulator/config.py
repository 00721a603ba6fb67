"""Emulator configuration: a pydantic model, loaded from YAML or JSON.

``load_config(None)`` returns the built-in default (the demo client, three
seeded orgs, controls on, the real approve page). ``emulator.example.yaml``
at the repository root documents every field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from salesmsg_emulator.scopes import SCOPES, parse_scope


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _scope_list(value: Any) -> list[str]:
    scopes = parse_scope(value) if isinstance(value, str | list | tuple) else value
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise ValueError(f"unknown scope(s): {', '.join(unknown)}")
    return scopes


class OAuthClientConfig(_Strict):
    """A registered OAuth application."""

    client_id: str = Field(min_length=1)
    client_secret: str = Field(min_length=1)
    name: str | None = Field(default=None, description="Shown on the approve page; client_id when omitted")
    redirect_uris: list[str] = Field(min_length=1, description="Matched exactly")
    baa_signed: bool = False
    scopes: list[str] | None = Field(default=None, description="Scopes the app may request; None = all")

    @field_validator("redirect_uris")
    @classmethod
    def _absolute(cls, uris: list[str]) -> list[str]:
        for uri in uris:
            parts = urlsplit(uri)
            if not parts.scheme or not (parts.netloc or parts.scheme not in ("http", "https")) or parts.fragment:
                raise ValueError(f"redirect URI must be absolute and without fragment: {uri!r}")
        return uris

    @field_validator("scopes", mode="before")
    @classmethod
    def _scopes(cls, value: Any) -> Any:
        return None if value is None else _scope_list(value)

    @property
    def display_name(self) -> str:
        return self.name or self.client_id


class OrgConfig(_Strict):
    """A Salesmsg organization (a tenant on Salesmsg's side)."""

    id: int = Field(gt=0)
    name: str = Field(min_length=1)
    hipaa: bool = False


class UserConfig(_Strict):
    """A Salesmsg user; the first user of an org is its owner."""

    id: int = Field(gt=0)
    name: str = Field(min_length=1)
    email: str = Field(min_length=3)
    org: int = Field(description="Id of the user's org")


class PatConfig(_Strict):
    """A personal access token that exists from the start."""

    token: str = Field(min_length=8)
    user: int
    scopes: list[str]
    ttl: int | None = Field(default=None, gt=0, description="Seconds from start; None = never expires")

    @field_validator("scopes", mode="before")
    @classmethod
    def _scopes(cls, value: Any) -> Any:
        return _scope_list(value)


class MessageStatusDelays(_Strict):
    """Seconds an outbound message spends in each state before moving on."""

    sent: float = Field(default=1.0, ge=0, description="queued -> sent, after queued_at (or send_at)")
    delivered: float = Field(default=2.0, ge=0, description="sent -> delivered, after sent_at")


RateLimitScope = Literal["org", "app", "token"]
TokenAnswer = Literal["observed", "401", "403", "500"]
DeadTokenAnswer = Literal["as_invalid", "401", "403", "500"]
ContactsListScope = Literal["contacts:read", "contacts:write"]


class EmulatorConfig(_Strict):
    """Everything the emulator needs to know at start."""

    clients: list[OAuthClientConfig] = Field(min_length=1)
    orgs: list[OrgConfig] = Field(min_length=1)
    users: list[UserConfig] = Field(min_length=1)
    personal_access_tokens: list[PatConfig] = Field(default_factory=list)

    auto_approve: bool = False
    rate_limit_per_minute: int = Field(default=60, ge=0)
    # What shares one budget (Salesmsg does not publish it): "org" (every token of the org),
    # "app" (the OAuth client; a PAT counts as its user's own app) or "token" (one authorization:
    # an OAuth grant with every token refreshed from it, a PAT with its replacements).
    rate_limit_scope: RateLimitScope = "org"
    # Whether a request during the 60 s lockout restarts it (unknown at Salesmsg).
    rate_limit_lockout_extends: bool = False
    # How a token that is not a decodable JWT (nor a known PAT) is answered: "observed" is what
    # was seen (403 "Could not decode token: ..." everywhere, 500 {"message": null} on GET /teams).
    invalid_token_answer: TokenAnswer = "observed"
    # How a well-formed token that is expired, revoked, unknown or badly signed is answered
    # (never observed): "as_invalid" answers it like invalid_token_answer.
    dead_token_answer: DeadTokenAnswer = "as_invalid"
    # The scope POST /contacts/list requires: the v2.3 document tags it contacts:write.
    contacts_list_scope: ContactsListScope = "contacts:write"
    # Whether automated messages name the member who set them up in user_id/user (unknown).
    automated_messages_user: bool = False
    html_errors: bool = False
    # how long an idle keep-alive connection stays open (Salesmsg's own is unknown): longer than the
    # 30 s a client like ours keeps one, so a reused connection is never one being closed
    keepalive_seconds: int = Field(default=75, ge=1, le=3600)
    controls_enabled: bool = False
    access_token_ttl: int = Field(default=86340, gt=0)
    pat_ttl: int = Field(default=3600, gt=0)
    code_ttl: int = Field(default=60, gt=0)
    message_status_delays: MessageStatusDelays = Field(default_factory=MessageStatusDelays)
    seed: int = 1
    contacts_per_org: int = Field(default=50, ge=0, le=90)
    conversations_per_org: int = Field(default=30, ge=0, le=90)
    persist_path: Path | None = None
    token_secret: str | None = Field(default=None, min_length=16, description="HS256 key; random when omitted")

    @model_validator(mode="after")
    def _references(self) -> EmulatorConfig:
        _unique("client_id", [c.client_id for c in self.clients])
        _unique("org id", [o.id for o in self.orgs])
        _unique("user id", [u.id for u in self.users])
        _unique("personal access token", [p.token for p in self.personal_access_tokens])
        org_ids = {o.id for o in self.orgs}
        user_ids = {u.id for u in self.users}
        for user in self.users:
            if user.org not in org_ids:
                raise ValueError(f"user {user.id} belongs to unknown org {user.org}")
        for pat in self.personal_access_tokens:
            if pat.user not in user_ids:
                raise ValueError(f"personal access token for unknown user {pat.user}")
        if self.conversations_per_org > self.contacts_per_org:
            raise ValueError("conversations_per_org cannot exceed contacts_per_org")
        return self

    def client(self, client_id: str) -> OAuthClientConfig | None:
        return next((c for c in self.clients if c.client_id == client_id), None)


def _unique(what: str, values: list[Any]) -> None:
    seen: set[Any] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"duplicate {what}: {value}")
        seen.add(value)


DEMO_PAT_SCOPES = ("conversations:read", "messages:read", "messages:write", "contacts:read", "teams:read",
                   "users:read", "organizations:read")  # fmt: skip
DEMO_APP_PORT = 8000


def demo_redirect_uris(app_port: int = DEMO_APP_PORT) -> list[str]:
    """The callbacks of Salesmsg Connect's demo on ``app_port`` (both loopback spellings)."""
    return [f"http://127.0.0.1:{app_port}/oauth/callback", f"http://localhost:{app_port}/oauth/callback"]


DEMO_REDIRECT_URIS = demo_redirect_uris()


def default_config(*, app_port: int = DEMO_APP_PORT) -> EmulatorConfig:
    """The built-in configuration used when no file is given: its clients accept the callbacks of
    an app on ``app_port`` (the demo passes its own port)."""
    return EmulatorConfig(
        clients=[
            OAuthClientConfig(
                client_id="demo-client",
                client_secret="demo-secret",
                name="Salesmsg Connect (demo)",
                redirect_uris=demo_redirect_uris(app_port),
                baa_signed=False,
            ),
            OAuthClientConfig(
                client_id="baa-client",
                client_secret="baa-secret",
                name="Salesmsg Connect (demo, BAA signed)",
                redirect_uris=demo_redirect_uris(app_port),
                baa_signed=True,
            ),
        ],
        orgs=[
            OrgConfig(id=1, name="Acme Clinic", hipaa=True),
            OrgConfig(id=2, name="Bright Dental", hipaa=True),
            OrgConfig(id=3, name="Corner Bakery", hipaa=False),
        ],
        users=[
            UserConfig(id=101, name="Avery Testwell", email="avery@acme-clinic.example", org=1),
            UserConfig(id=102, name="Alex Sampleton", email="alex@acme-clinic.example", org=1),
            UserConfig(id=201, name="Blair Fakeley", email="blair@bright-dental.example", org=2),
            UserConfig(id=202, name="Bo Demoson", email="bo@bright-dental.example", org=2),
            UserConfig(id=301, name="Casey Placeholder", email="casey@corner-bakery.example", org=3),
            UserConfig(id=302, name="Cam Mockford", email="cam@corner-bakery.example", org=3),
        ],
        personal_access_tokens=[
            PatConfig(
                token="pat-acme-avery-0000000000000000",
                user=101,
                scopes=list(DEMO_PAT_SCOPES),
            ),
            PatConfig(
                token="pat-corner-casey-000000000000000",
                user=301,
                scopes=list(DEMO_PAT_SCOPES),
            ),
        ],
        auto_approve=False,
        controls_enabled=True,
    )


def load_config(path: Path | None) -> EmulatorConfig:
    """Load the configuration from a YAML or JSON file, or the default when ``path`` is None.

    A relative ``persist_path`` is resolved against the file's directory.
    Raises ``ConfigError`` with a readable message on any problem.
    """
    if path is None:
        return default_config()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read emulator config {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"emulator config {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"emulator config {path} must be a mapping at the top level")
    try:
        config = EmulatorConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid emulator config {path}:\n{exc}") from exc
    if config.persist_path is not None and not config.persist_path.is_absolute():
        config = config.model_copy(update={"persist_path": (path.parent / config.persist_path).resolve()})
    return config
