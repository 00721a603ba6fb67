"""upstream budgets: Salesmsg's request budget per connection, shared by every process

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "upstream_budgets",
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("ledger", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_upstream_budgets")),
    )


def downgrade() -> None:
    op.drop_table("upstream_budgets")
