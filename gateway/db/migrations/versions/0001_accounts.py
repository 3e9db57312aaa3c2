"""Accounts: tenants, API keys and quota policies.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.String(32)
_NAME = sa.String(200)
_TIMESTAMP = sa.DateTime(timezone=True)
# Exact decimal text on SQLite, which would otherwise store NUMERIC values as binary floats.
_MONEY = sa.Numeric(18, 6).with_variant(sa.String(32), "sqlite")
_TENANT_LEVEL = sa.text("key_id IS NULL")


def upgrade() -> None:
    op.create_table(
        "tenant",
        sa.Column("id", _ID, nullable=False),
        sa.Column("name", _NAME, nullable=False),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.Column("deleted_at", _TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_tenant"),
    )
    op.create_table(
        "api_key",
        sa.Column("id", _ID, nullable=False),
        sa.Column("tenant_id", _ID, nullable=False),
        sa.Column("name", _NAME, nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("last4", sa.String(4), nullable=False),
        sa.Column("models", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("expires_at", _TIMESTAMP, nullable=True),
        sa.Column("revoked_at", _TIMESTAMP, nullable=True),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.CheckConstraint("role IN ('user', 'admin')", name="ck_api_key_role"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenant.id"], name="fk_api_key_tenant_id_tenant"),
        sa.PrimaryKeyConstraint("id", name="pk_api_key"),
    )
    op.create_index("ix_api_key_tenant_id", "api_key", ["tenant_id"])
    op.create_index("ix_api_key_digest", "api_key", ["digest"], unique=True)
    op.create_table(
        "quota_policy",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant_id", _ID, nullable=False),
        sa.Column("key_id", _ID, nullable=True),
        sa.Column("rpm", sa.Integer(), nullable=True),
        sa.Column("tpm", sa.BigInteger(), nullable=True),
        sa.Column("max_concurrency", sa.Integer(), nullable=True),
        sa.Column("daily_tokens", sa.BigInteger(), nullable=True),
        sa.Column("monthly_tokens", sa.BigInteger(), nullable=True),
        sa.Column("monthly_spend_usd", _MONEY, nullable=True),
        sa.Column("updated_at", _TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenant.id"], name="fk_quota_policy_tenant_id_tenant"
        ),
        sa.ForeignKeyConstraint(["key_id"], ["api_key.id"], name="fk_quota_policy_key_id_api_key"),
        sa.PrimaryKeyConstraint("id", name="pk_quota_policy"),
        sa.UniqueConstraint("tenant_id", "key_id", name="uq_quota_policy_tenant_id_key_id"),
    )
    # NULLs are distinct in unique constraints: one tenant-level policy needs its own index.
    op.create_index(
        "uq_quota_policy_tenant_level",
        "quota_policy",
        ["tenant_id"],
        unique=True,
        sqlite_where=_TENANT_LEVEL,
        postgresql_where=_TENANT_LEVEL,
    )


def downgrade() -> None:
    op.drop_index("uq_quota_policy_tenant_level", table_name="quota_policy")
    op.drop_table("quota_policy")
    op.drop_index("ix_api_key_digest", table_name="api_key")
    op.drop_index("ix_api_key_tenant_id", table_name="api_key")
    op.drop_table("api_key")
    op.drop_table("tenant")
