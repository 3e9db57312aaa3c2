"""Billing: engine time priced by the device that served it.

Each event names its device kind, the device's rate per hour and the cost of its engine time
at that rate (part of its cost); the device rollups sum engine time and its cost per model,
device kind and rate, for the invoices' device lines.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PRICE = sa.Numeric(18, 6).with_variant(sa.String(20), "sqlite")
_COST = sa.Numeric(30, 12).with_variant(sa.String(32), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("usage_event") as table:
        table.add_column(sa.Column("device", sa.String(length=64), nullable=True))
        table.add_column(sa.Column("device_hour_usd", _PRICE, nullable=True))
        table.add_column(sa.Column("device_cost_usd", _COST, nullable=False, server_default="0"))
    op.create_table(
        "device_rollup",
        sa.Column("tenant_id", sa.String(length=32), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("hour_usd", _PRICE, nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("gpu_ms", sa.Double(), nullable=False),
        sa.Column("cost_usd", _COST, nullable=False),
        sa.PrimaryKeyConstraint(
            "tenant_id", "key_id", "model", "day", "device", "hour_usd", name="pk_device_rollup"
        ),
    )
    op.create_index("ix_device_rollup_day", "device_rollup", ["day"])


def downgrade() -> None:
    op.drop_index("ix_device_rollup_day", table_name="device_rollup")
    op.drop_table("device_rollup")
    with op.batch_alter_table("usage_event") as table:
        for name in ("device_cost_usd", "device_hour_usd", "device"):
            table.drop_column(name)
