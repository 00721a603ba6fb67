"""people, links and MFA: connect links spent on completion and revocable, operator invitations,
password resets, TOTP and recovery codes, the Salesmsg org and user ids of a connection, an
index for the audit page's actor filter

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("disabled_by", sa.String(length=320), nullable=True))
        batch.add_column(sa.Column("password_changed_at", UTC_TIME, nullable=True))
        batch.add_column(sa.Column("mfa_secret_ct", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("mfa_enabled_at", UTC_TIME, nullable=True))
        batch.add_column(sa.Column("mfa_last_step", sa.BigInteger(), nullable=True))
    op.create_table(
        "mfa_recovery_codes",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("code_hash", sa.String(length=255), nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("used_at", UTC_TIME, nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_mfa_recovery_codes_user_id_users"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mfa_recovery_codes")),
    )
    op.create_index(op.f("ix_mfa_recovery_codes_user_id"), "mfa_recovery_codes", ["user_id"])
    op.create_table(
        "password_resets",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("created_by", sa.String(length=320), nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("expires_at", UTC_TIME, nullable=False),
        sa.Column("used_at", UTC_TIME, nullable=True),
        sa.Column("revoked_at", UTC_TIME, nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_password_resets_user_id_users"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_password_resets")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_password_resets_token_hash")),
    )
    op.create_index(op.f("ix_password_resets_user_id"), "password_resets", ["user_id"])
    with op.batch_alter_table("login_attempts") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=16), server_default="password", nullable=False))
    with op.batch_alter_table("connect_links") as batch:
        batch.add_column(sa.Column("first_opened_at", UTC_TIME, nullable=True))
        batch.add_column(sa.Column("open_count", sa.Integer(), server_default=sa.text("0"), nullable=False))
        batch.add_column(sa.Column("revoked_at", UTC_TIME, nullable=True))
        batch.add_column(sa.Column("revoked_by", sa.String(length=320), nullable=True))
    with op.batch_alter_table("web_sessions") as batch:
        batch.add_column(sa.Column("link_id", sa.Uuid(), nullable=True))
        batch.add_column(sa.Column("stage", sa.String(length=16), server_default="full", nullable=False))
        batch.create_foreign_key(op.f("fk_web_sessions_link_id_connect_links"), "connect_links", ["link_id"], ["id"],
                                 ondelete="CASCADE")
    with op.batch_alter_table("invitations") as batch:
        batch.add_column(sa.Column("role", sa.String(length=20), server_default="org_admin", nullable=False))
        batch.add_column(sa.Column("revoked_at", UTC_TIME, nullable=True))
        batch.add_column(sa.Column("revoked_by", sa.String(length=320), nullable=True))
        batch.alter_column("tenant_id", existing_type=sa.Uuid(), nullable=True)
        batch.create_check_constraint("role", "role in ('operator', 'org_admin')")
        batch.create_check_constraint("org_admin_tenant", "role = 'operator' or tenant_id is not null")
    with op.batch_alter_table("connections") as batch:
        batch.add_column(sa.Column("salesmsg_user_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("salesmsg_org_id", sa.String(length=64), nullable=True))
        batch.create_index(op.f("ix_connections_salesmsg_org_id"), ["salesmsg_org_id"])
    op.create_index("ix_audit_log_actor_id_id", "audit_log", ["actor_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_audit_log_actor_id_id", table_name="audit_log")
    with op.batch_alter_table("connections") as batch:
        batch.drop_index(op.f("ix_connections_salesmsg_org_id"))
        batch.drop_column("salesmsg_org_id")
        batch.drop_column("salesmsg_user_id")
    op.execute("DELETE FROM invitations WHERE role = 'operator'")
    with op.batch_alter_table("invitations") as batch:
        batch.drop_constraint("org_admin_tenant", type_="check")
        batch.drop_constraint("role", type_="check")
        batch.alter_column("tenant_id", existing_type=sa.Uuid(), nullable=False)
        batch.drop_column("revoked_by")
        batch.drop_column("revoked_at")
        batch.drop_column("role")
    with op.batch_alter_table("web_sessions") as batch:
        batch.drop_constraint(op.f("fk_web_sessions_link_id_connect_links"), type_="foreignkey")
        batch.drop_column("stage")
        batch.drop_column("link_id")
    with op.batch_alter_table("connect_links") as batch:
        batch.drop_column("revoked_by")
        batch.drop_column("revoked_at")
        batch.drop_column("open_count")
        batch.drop_column("first_opened_at")
    with op.batch_alter_table("login_attempts") as batch:
        batch.drop_column("kind")
    op.drop_index(op.f("ix_password_resets_user_id"), table_name="password_resets")
    op.drop_table("password_resets")
    op.drop_index(op.f("ix_mfa_recovery_codes_user_id"), table_name="mfa_recovery_codes")
    op.drop_table("mfa_recovery_codes")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("mfa_last_step")
        batch.drop_column("mfa_enabled_at")
        batch.drop_column("mfa_secret_ct")
        batch.drop_column("password_changed_at")
        batch.drop_column("disabled_by")
