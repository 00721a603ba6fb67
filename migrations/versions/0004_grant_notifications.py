"""grant notifications: PostgreSQL tells every process when a row the proxy's grant is made of changes

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06

Triggers on api_keys, api_key_tenants, tenants, connections and tenant_keys send a notification on
channel ``smc_grants`` (delivered when the transaction commits, once per transaction and table);
``app.proxy.grant_cache`` empties its cache on each. An update notifies only when it sets a column
a grant reads (a key's ``last_used_at``, a connection's refresh lease do not). Nothing on SQLite.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# the columns of each table that GrantLookup reads (app/proxy/grants.py)
GRANT_COLUMNS = {
    "api_keys": ("id", "prefix", "key_hash", "all_tenants", "read_only", "revoked_at"),
    "api_key_tenants": ("api_key_id", "tenant_id"),
    "tenants": ("id", "slug", "hipaa", "baa_signed_at"),
    "connections": ("id", "tenant_id", "kind", "status", "scopes", "version", "access_token_ct", "access_expires_at"),
    "tenant_keys": ("id", "tenant_id", "master_key_id", "wrapped_key"),
}


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        """
        CREATE FUNCTION smc_grants_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('smc_grants', TG_TABLE_NAME);
            RETURN NULL;
        END
        $$
        """
    )
    for table, columns in GRANT_COLUMNS.items():
        op.execute(
            f"CREATE TRIGGER smc_grants_changed AFTER INSERT OR DELETE OR UPDATE OF {', '.join(columns)} ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION smc_grants_changed()"
        )
        op.execute(
            f"CREATE TRIGGER smc_grants_truncated AFTER TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION smc_grants_changed()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in GRANT_COLUMNS:
        op.execute(f"DROP TRIGGER IF EXISTS smc_grants_truncated ON {table}")
        op.execute(f"DROP TRIGGER IF EXISTS smc_grants_changed ON {table}")
    op.execute("DROP FUNCTION IF EXISTS smc_grants_changed()")
