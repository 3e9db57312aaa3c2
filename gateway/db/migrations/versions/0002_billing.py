"""Billing: price versions, usage events, their daily rollups and the SQL outbox.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.String(32)
_EVENT_ID = sa.String(64)
_MODEL = sa.String(200)
_TIMESTAMP = sa.DateTime(timezone=True)
# Exact decimal text on SQLite, which would otherwise store NUMERIC values as binary floats.
_PRICE = sa.Numeric(18, 6).with_variant(sa.String(20), "sqlite")
_COST = sa.Numeric(30, 12).with_variant(sa.String(32), "sqlite")
_COUNT = sa.BigInteger()


def upgrade() -> None:
    op.create_table(
        "price",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("model", _MODEL, nullable=False),
        sa.Column("input_per_mtok", _PRICE, nullable=False),
        sa.Column("cached_input_per_mtok", _PRICE, nullable=False),
        sa.Column("output_per_mtok", _PRICE, nullable=False),
        sa.Column("effective_from", _TIMESTAMP, nullable=False),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_price"),
        sa.UniqueConstraint("model", "effective_from", name="uq_price_model_effective_from"),
    )
    op.create_table(
        "usage_event",
        sa.Column("id", _EVENT_ID, nullable=False),
        sa.Column("occurred_at", _TIMESTAMP, nullable=False),
        sa.Column("tenant_id", _ID, nullable=False),
        sa.Column("key_id", _ID, nullable=True),
        sa.Column("model", _MODEL, nullable=False),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("prompt_tokens", _COUNT, nullable=False),
        sa.Column("cached_tokens", _COUNT, nullable=False),
        sa.Column("completion_tokens", _COUNT, nullable=False),
        sa.Column("cache_tier", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("latency_ms", sa.Double(), nullable=False),
        sa.Column("ttft_ms", sa.Double(), nullable=True),
        sa.Column("gpu_ms", sa.Double(), nullable=True),
        sa.Column("cost_usd", _COST, nullable=False),
        sa.Column("price_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_usage_event"),
    )
    op.create_index("ix_usage_event_occurred_at", "usage_event", ["occurred_at"])
    op.create_index(
        "ix_usage_event_tenant_id_occurred_at", "usage_event", ["tenant_id", "occurred_at"]
    )
    op.create_table(
        "usage_rollup",
        sa.Column("tenant_id", _ID, nullable=False),
        sa.Column("key_id", _ID, nullable=False),
        sa.Column("model", _MODEL, nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("price_id", sa.Integer(), nullable=False),
        sa.Column("requests", _COUNT, nullable=False),
        sa.Column("prompt_tokens", _COUNT, nullable=False),
        sa.Column("cached_tokens", _COUNT, nullable=False),
        sa.Column("completion_tokens", _COUNT, nullable=False),
        sa.Column("input_cost", _COST, nullable=False),
        sa.Column("cached_input_cost", _COST, nullable=False),
        sa.Column("output_cost", _COST, nullable=False),
        sa.Column("cost_usd", _COST, nullable=False),
        sa.PrimaryKeyConstraint(
            "tenant_id", "key_id", "model", "day", "price_id", name="pk_usage_rollup"
        ),
    )
    op.create_index("ix_usage_rollup_day", "usage_rollup", ["day"])
    op.create_table(
        "outbox",
        # SQLite: INTEGER PRIMARY KEY AUTOINCREMENT, a rowid that is never reused.
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("event_id", _EVENT_ID, nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_outbox"),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("outbox")
    op.drop_index("ix_usage_rollup_day", table_name="usage_rollup")
    op.drop_table("usage_rollup")
    op.drop_index("ix_usage_event_tenant_id_occurred_at", table_name="usage_event")
    op.drop_index("ix_usage_event_occurred_at", table_name="usage_event")
    op.drop_table("usage_event")
    op.drop_table("price")
