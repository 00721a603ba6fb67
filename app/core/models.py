"""Tables. Alembic migrations are the only way the schema is made; tests check they agree."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    false,
    text,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime on every backend (SQLite stores naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


def _created() -> Mapped[datetime]:
    return mapped_column(UTCDateTime, default=utcnow, nullable=False)


class Tenant(Base):
    """One customer org. HIPAA defaults to true: fail closed until an operator says otherwise."""

    __tablename__ = "tenants"
    __table_args__ = (CheckConstraint("length(slug) between 2 and 63", name="slug_length"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    slug: Mapped[str] = mapped_column(String(63), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    hipaa: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    baa_signed_at: Mapped[datetime | None]
    baa_signed_by: Mapped[str | None] = mapped_column(String(320))
    baa_reference: Mapped[str | None] = mapped_column(String(200))
    baa_note: Mapped[str | None] = mapped_column(Text)
    webhook_url: Mapped[str | None] = mapped_column(String(2000))
    webhook_secret_ct: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    @property
    def baa_signed(self) -> bool:
        return self.baa_signed_at is not None


class TenantKey(Base):
    """A tenant's data key, wrapped by a master key. Deleting the row shreds the tenant's tokens."""

    __tablename__ = "tenant_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), unique=True
    )
    master_key_id: Mapped[str] = mapped_column(String(64))
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = _created()
    rotated_at: Mapped[datetime | None]


class User(Base):
    __tablename__ = "users"
    __table_args__ = (
        CheckConstraint("role in ('operator', 'org_admin')", name="role"),
        CheckConstraint("role = 'operator' or tenant_id is not null", name="org_admin_tenant"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    password_hash: Mapped[str | None] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(20))
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = _created()
    last_login_at: Mapped[datetime | None]
    disabled_at: Mapped[datetime | None]
    disabled_by: Mapped[str | None] = mapped_column(String(320))
    password_changed_at: Mapped[datetime | None]
    # TOTP: the secret sealed with AES-GCM (AAD: the user id); the last accepted time step, so a
    # code is accepted once (no replay within its window).
    mfa_secret_ct: Mapped[bytes | None] = mapped_column(LargeBinary)
    mfa_enabled_at: Mapped[datetime | None]
    mfa_last_step: Mapped[int | None] = mapped_column(BigInteger)


class RecoveryCode(Base):
    """One MFA recovery code: shown once at enrolment, stored hashed, spent once."""

    __tablename__ = "mfa_recovery_codes"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    code_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = _created()
    used_at: Mapped[datetime | None]


class PasswordReset(Base):
    """An operator-issued password reset link: shown once, stored hashed, single use, short expiry."""

    __tablename__ = "password_resets"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_by: Mapped[str] = mapped_column(String(320))
    created_at: Mapped[datetime] = _created()
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class WebSession(Base):
    """A browser session. The cookie holds a random token; the row is keyed by its SHA-256.

    A signed-in session has a user; a connect-link session has only a tenant (and the link, which
    is spent when the connection completes). ``stage`` is ``full`` once signed in, ``mfa`` while
    the password was right and the second factor is still due (the user is not signed in yet).
    """

    __tablename__ = "web_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    link_tenant_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE")
    )
    link_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("connect_links.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(16), default="full", server_default="full")
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = _created()
    last_seen_at: Mapped[datetime] = _created()
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class LoginAttempt(Base):
    __tablename__ = "login_attempts"
    __table_args__ = (Index("ix_login_attempts_email_at", "email", "at"), Index("ix_login_attempts_ip_at", "ip", "at"))

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    email: Mapped[str] = mapped_column(String(320))
    ip: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16), default="password", server_default="password")
    succeeded: Mapped[bool] = mapped_column(Boolean, default=False)
    at: Mapped[datetime] = _created()


class Invitation(Base):
    """An invitation (an org admin of a tenant, or an operator): single use, expiring, revocable;
    the token is shown once and stored hashed. Opening it spends nothing; accepting it does."""

    __tablename__ = "invitations"
    __table_args__ = (
        CheckConstraint("role in ('operator', 'org_admin')", name="role"),
        CheckConstraint("role = 'operator' or tenant_id is not null", name="org_admin_tenant"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(20), default="org_admin", server_default="org_admin")
    email: Mapped[str] = mapped_column(String(320))
    created_by: Mapped[str] = mapped_column(String(320))
    created_at: Mapped[datetime] = _created()
    expires_at: Mapped[datetime]
    accepted_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    revoked_by: Mapped[str | None] = mapped_column(String(320))


class ConnectLink(Base):
    """A link that lets a tenant's admin connect without an account: expiring, revocable, spent
    (``used_at``) when a connection made through it completes, not when it is opened (mail
    scanners and link previews open links before people do)."""

    __tablename__ = "connect_links"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    created_by: Mapped[str] = mapped_column(String(320))
    created_at: Mapped[datetime] = _created()
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    first_opened_at: Mapped[datetime | None]
    open_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    revoked_at: Mapped[datetime | None]
    revoked_by: Mapped[str | None] = mapped_column(String(320))


class OAuthState(Base):
    """A pending authorization: single use, 10 minutes, bound to a session and a tenant."""

    __tablename__ = "oauth_states"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    state_hash: Mapped[str] = mapped_column(String(64), unique=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("web_sessions.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    scopes: Mapped[str] = mapped_column(Text)
    pkce_verifier_ct: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_by: Mapped[str] = mapped_column(String(320))
    created_at: Mapped[datetime] = _created()
    expires_at: Mapped[datetime]
    consumed_at: Mapped[datetime | None]


class Connection(Base):
    """A tenant's link to its Salesmsg org: tokens (encrypted), scopes, refresh bookkeeping."""

    __tablename__ = "connections"
    __table_args__ = (
        CheckConstraint("kind in ('oauth', 'pat')", name="kind"),
        CheckConstraint("status in ('active', 'needs_reauth', 'disconnected')", name="status"),
        Index(
            "ix_connections_due",
            "access_expires_at",
            postgresql_where=text("status = 'active'"),
            sqlite_where=text("status = 'active'"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), unique=True)
    kind: Mapped[str] = mapped_column(String(10))
    status: Mapped[str] = mapped_column(String(20))
    scopes: Mapped[str] = mapped_column(Text, default="")
    access_token_ct: Mapped[bytes | None] = mapped_column(LargeBinary)
    refresh_token_ct: Mapped[bytes | None] = mapped_column(LargeBinary)
    access_expires_at: Mapped[datetime | None]
    version: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None]
    last_refresh_at: Mapped[datetime | None]
    refresh_failures: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    next_refresh_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(String(200))
    salesmsg_user: Mapped[str | None] = mapped_column(String(200))
    salesmsg_org: Mapped[str | None] = mapped_column(String(200))
    salesmsg_user_id: Mapped[str | None] = mapped_column(String(64))
    salesmsg_org_id: Mapped[str | None] = mapped_column(String(64), index=True)
    connected_at: Mapped[datetime | None]
    connected_by: Mapped[str | None] = mapped_column(String(320))
    disconnected_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class ConnectionEvent(Base):
    __tablename__ = "connection_events"
    __table_args__ = (Index("ix_connection_events_tenant_id_id", "tenant_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    connection_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    type: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = _created()


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint("status in ('pending', 'delivered', 'failed')", name="status"),
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("connection_events.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2000))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(String(200))
    next_attempt_at: Mapped[datetime] = _created()
    delivered_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = _created()


class AuditEntry(Base):
    """Append-only, hash-chained. The app never updates or deletes a row; Postgres enforces it."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_tenant_id_at", "tenant_id", "at"),
        Index("ix_audit_log_at", "at"),
        Index("ix_audit_log_actor_id_id", "actor_id", "id"),  # the audit page's actor filter
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime]
    actor_type: Mapped[str] = mapped_column(String(16))
    actor_id: Mapped[str | None] = mapped_column(String(320))
    tenant_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(String(300))
    outcome: Mapped[str] = mapped_column(String(16))
    request_id: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class ApiKey(Base):
    """A key for internal services: shown once, stored as SHA-256 with a lookup prefix."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    prefix: Mapped[str] = mapped_column(String(24), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    all_tenants: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    read_only: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    operator: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_by: Mapped[str] = mapped_column(String(320))
    created_at: Mapped[datetime] = _created()
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class ApiKeyTenant(Base):
    __tablename__ = "api_key_tenants"

    api_key_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class IdempotencyRecord(Base):
    """The first answer to a POST carrying an Idempotency-Key, kept per tenant for 24 hours."""

    __tablename__ = "idempotency_records"
    __table_args__ = (UniqueConstraint("tenant_id", "key", name="uq_idempotency_records_tenant_key"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    fingerprint: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    status_code: Mapped[int | None]
    content_type: Mapped[str | None] = mapped_column(String(200))
    body_ct: Mapped[bytes | None] = mapped_column(LargeBinary)  # encrypted: may hold PHI
    created_at: Mapped[datetime] = _created()
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class BudgetLedger(Base):
    """One Salesmsg request budget (``app.proxy.budget.Ledger``, as JSON): the grants of its last
    window, its pacing schedule, and the end of a lockout Salesmsg started with a 429."""

    __tablename__ = "upstream_budgets"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    ledger: Mapped[str] = mapped_column(Text)
