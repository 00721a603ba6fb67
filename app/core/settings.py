"""Settings, read from the environment (prefix ``SMC_``) or a ``.env`` file.

Settings are built by the caller (``create_app(settings)``, the CLI), never at import time.
Outside development the app refuses to start with a missing or example secret.
"""

from __future__ import annotations

import base64
import binascii
from enum import StrEnum
from functools import cached_property
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Values shipped in .env.example and used by the development defaults. A production
# deployment that still carries one of these refuses to start.
EXAMPLE_SESSION_SECRET = "dev-session-secret-change-me-0000000000000000"
EXAMPLE_MASTER_KEYS = "dev1:ZGV2LW9ubHktbWFzdGVyLWtleS0zMi1ieXRlcyEhISE="
EXAMPLE_CLIENT_SECRET = "demo-secret"
EXAMPLE_SECRETS = {
    "SMC_SESSION_SECRET": {EXAMPLE_SESSION_SECRET, "", "change-me"},
    "SMC_MASTER_KEYS": {EXAMPLE_MASTER_KEYS, ""},
    "SMC_SALESMSG_CLIENT_SECRET": {EXAMPLE_CLIENT_SECRET, "", "change-me"},
}


class Env(StrEnum):
    development = "development"
    production = "production"


class InsecureSettingsError(RuntimeError):
    """Raised when production settings carry a missing or example secret."""


def parse_master_keys(raw: str) -> list[tuple[str, bytes]]:
    """Parse ``id:base64key,id2:base64key`` into ``[(id, 32 bytes), ...]``; the first encrypts."""
    keys: list[tuple[str, bytes]] = []
    seen: set[str] = set()
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        key_id, sep, encoded = part.partition(":")
        key_id = key_id.strip()
        if not sep or not key_id or not key_id.replace("-", "").replace("_", "").isalnum():
            raise ValueError("SMC_MASTER_KEYS entries look like 'keyid:base64-of-32-bytes'")
        if key_id in seen:
            raise ValueError(f"SMC_MASTER_KEYS repeats the key id {key_id!r}")
        try:
            key = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"SMC_MASTER_KEYS key {key_id!r} is not valid base64") from exc
        if len(key) != 32:
            raise ValueError(f"SMC_MASTER_KEYS key {key_id!r} must be 32 bytes, not {len(key)}")
        seen.add(key_id)
        keys.append((key_id, key))
    if not keys:
        raise ValueError("SMC_MASTER_KEYS holds no key")
    return keys


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SMC_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    env: Env = Env.development
    log_level: str = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"

    database_url: str = "sqlite+aiosqlite:///./var/salesmsg-connect.db"
    database_pool_size: int = Field(default=10, ge=1, le=200)

    public_url: str = "http://127.0.0.1:8000"
    session_secret: str = EXAMPLE_SESSION_SECRET
    master_keys: str = EXAMPLE_MASTER_KEYS
    master_key_file: str | None = None

    salesmsg_api_base: str = "https://api.salesmessage.com/pub/v2.2"
    salesmsg_authorize_url: str = "https://app.salesmessage.com/auth/oauth"
    salesmsg_token_url: str | None = None
    salesmsg_refresh_style: Literal["salesmsg", "rfc6749"] = "salesmsg"
    salesmsg_client_id: str = "demo-client"
    salesmsg_client_secret: str = EXAMPLE_CLIENT_SECRET
    salesmsg_timeout_seconds: float = Field(default=15.0, gt=0, le=300)
    salesmsg_connect_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    salesmsg_pkce: bool = True
    # Who is asking, on the consent screen: the integration's name and what it is for, in one line.
    integration_name: str = Field(default="Salesmsg Connect", min_length=1, max_length=80)
    integration_purpose: str = Field(
        default="Reads and answers your Salesmsg conversations for the services you use with it.",
        min_length=1, max_length=300,
    )
    # Minimum necessary: what the dashboard needs to list and answer conversations.
    default_scopes: str = (
        "conversations:read messages:read messages:write contacts:read teams:read users:read"
    )
    # calls:read, recordings:read and recordings:write: named by Salesmsg's PHI list but not by its
    # scope table, so not offered nor requested (asking for them may fail the authorization) unless on.
    offer_unlisted_phi_scopes: bool = False

    session_idle_minutes: int = Field(default=30, ge=1)
    session_absolute_hours: int = Field(default=12, ge=1)
    login_attempts_per_15_minutes: int = Field(default=10, ge=1)
    connect_link_hours: int = Field(default=72, ge=1)
    invitation_hours: int = Field(default=72, ge=1)
    password_reset_minutes: int = Field(default=30, ge=5, le=24 * 60)
    # TOTP for every operator: always in production, and wherever this is true.
    require_mfa: bool = False
    mfa_attempts_per_15_minutes: int = Field(default=5, ge=1)

    refresh_margin_seconds: int = Field(default=300, ge=0)
    refresh_lease_seconds: int = Field(default=60, ge=5)
    refresh_max_failures: int = Field(default=8, ge=1)
    refresh_backoff_base_seconds: float = Field(default=5.0, gt=0)
    refresh_backoff_max_seconds: float = Field(default=900.0, gt=0)
    run_worker: bool = False
    worker_interval_seconds: float = Field(default=30.0, gt=0)
    worker_batch_size: int = Field(default=50, ge=1, le=1000)
    worker_concurrency: int = Field(default=8, ge=1, le=200)

    proxy_max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    proxy_max_retries: int = Field(default=2, ge=0, le=10)
    proxy_retry_base_seconds: float = Field(default=0.2, ge=0)
    proxy_retry_after_cap_seconds: float = Field(default=10.0, ge=0)
    idempotency_ttl_hours: int = Field(default=24, ge=1)
    # PostgreSQL only: keep the proxy's grant rows in memory while LISTEN/NOTIFY proves them fresh
    # (``app.proxy.grant_cache``: other processes' changes seen within 100 ms, this process's at once)
    grant_cache: bool = True
    rate_limit_per_key: str = "600/minute"
    rate_limit_per_tenant: str = "120/minute"
    redis_url: str | None = None
    # Salesmsg's request budget (``app.proxy.budget``): calls per minute to Salesmsg, shared by every
    # process; 0 turns it off. "connection": one budget per tenant's connection; "app": one for every
    # OAuth connection of our client id (if Salesmsg counts per OAuth app; PAT connections keep their own).
    upstream_budget_per_minute: int = Field(default=60, ge=0)
    upstream_budget_scope: Literal["connection", "app"] = "connection"
    upstream_budget_max_wait_seconds: float = Field(default=10.0, ge=0, le=60)
    upstream_budget_guard_seconds: float = Field(default=1.0, ge=0, le=30)
    upstream_budget_burst: int = Field(default=10, ge=1)
    upstream_lockout_seconds: int = Field(default=60, ge=1, le=3600)

    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    webhook_max_attempts: int = Field(default=8, ge=1)

    metrics_enabled: bool = True
    # OpenTelemetry traces over OTLP/HTTP (``app.core.tracing``): the collector's base URL, as in
    # OTEL_EXPORTER_OTLP_ENDPOINT (traces go to /v1/traces); the standard OTEL_* variables work too.
    otel_exporter_otlp_endpoint: str | None = None

    # the HTTP server (``salesmsg-connect serve``)
    max_header_bytes: int = Field(default=64 * 1024, ge=4 * 1024, le=1024 * 1024)
    max_headers: int = Field(default=100, ge=20, le=1000)
    keepalive_seconds: int = Field(default=75, ge=1, le=3600)
    # addresses of the load balancers whose X-Forwarded-For / -Proto are believed (comma-separated,
    # CIDR allowed, "*" for any: only where nothing else can reach the app); empty: none
    forwarded_allow_ips: str = ""

    @field_validator("public_url", "salesmsg_api_base", "salesmsg_authorize_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http(s) URL")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment")
        return value.rstrip("/")

    @field_validator("otel_exporter_otlp_endpoint")
    @classmethod
    def _otlp_endpoint(cls, value: str | None) -> str | None:
        if not value or not value.strip():
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http(s) URL")
        return value.strip()

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if value.startswith("postgresql://") or value.startswith("postgres://"):
            value = "postgresql+asyncpg://" + value.split("://", 1)[1]
        if value.startswith("sqlite://") and not value.startswith("sqlite+aiosqlite://"):
            value = "sqlite+aiosqlite://" + value.split("://", 1)[1]
        if not (value.startswith("postgresql+asyncpg://") or value.startswith("sqlite+aiosqlite://")):
            raise ValueError("takes a postgresql:// (asyncpg) or sqlite:// (aiosqlite) URL")
        return value

    @model_validator(mode="after")
    def _keys_parse(self) -> "Settings":
        self.keyring_entries  # parse early so a bad key fails at startup
        return self

    @cached_property
    def keyring_entries(self) -> list[tuple[str, bytes]]:
        raw = self.master_keys
        if self.master_key_file:
            with open(self.master_key_file, encoding="utf-8") as fh:
                raw = ",".join(line.strip() for line in fh if line.strip() and not line.startswith("#"))
        return parse_master_keys(raw)

    @property
    def is_production(self) -> bool:
        return self.env is Env.production

    @property
    def mfa_required_for_operators(self) -> bool:
        return self.require_mfa or self.is_production

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def https(self) -> bool:
        return self.public_url.startswith("https://")

    @property
    def redirect_uri(self) -> str:
        return self.public_url + "/oauth/callback"

    @property
    def token_url(self) -> str:
        return (self.salesmsg_token_url or self.salesmsg_api_base + "/oauth/token").rstrip("/")

    @property
    def refresh_url(self) -> str:
        if self.salesmsg_refresh_style == "salesmsg":
            return self.salesmsg_api_base + "/oauth/token/refresh"
        return self.token_url

    @property
    def pat_refresh_url(self) -> str:
        return self.salesmsg_api_base + "/oauth/personal-token/refresh"

    def insecure_settings(self) -> list[str]:
        """Names of secrets that are missing or still carry an example value."""
        current = {
            "SMC_SESSION_SECRET": self.session_secret,
            "SMC_MASTER_KEYS": "" if self.master_key_file else self.master_keys,
            "SMC_SALESMSG_CLIENT_SECRET": self.salesmsg_client_secret,
        }
        bad = [name for name, value in current.items() if value.strip() in EXAMPLE_SECRETS[name]]
        if self.master_key_file:
            bad = [n for n in bad if n != "SMC_MASTER_KEYS"]
        elif any(key == base64.b64decode(EXAMPLE_MASTER_KEYS.split(":", 1)[1]) for _, key in self.keyring_entries):
            bad.append("SMC_MASTER_KEYS")
        if len(self.session_secret) < 32 and "SMC_SESSION_SECRET" not in bad:
            bad.append("SMC_SESSION_SECRET")
        return sorted(set(bad))

    def check_secure(self) -> None:
        """Refuse production settings that carry a missing or example secret."""
        if not self.is_production:
            return
        bad = self.insecure_settings()
        if bad:
            raise InsecureSettingsError(
                "refusing to start in production with a missing or example secret: " + ", ".join(bad)
            )
