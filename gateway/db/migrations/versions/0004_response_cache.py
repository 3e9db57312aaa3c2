"""Billing: response-cache prices, the response-cache answers' share of each rollup, and the
rollups' engine time.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-20
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PRICE = sa.Numeric(18, 6).with_variant(sa.String(20), "sqlite")
_COST = sa.Numeric(30, 12).with_variant(sa.String(32), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("price") as table:
        table.add_column(sa.Column("response_input_per_mtok", _PRICE, nullable=True))
        table.add_column(
            sa.Column("response_output_per_mtok", _PRICE, nullable=False, server_default="0")
        )
    with op.batch_alter_table("usage_rollup") as table:
        for name in ("response_prompt_tokens", "response_completion_tokens"):
            table.add_column(sa.Column(name, sa.BigInteger(), nullable=False, server_default="0"))
        for name in ("response_input_cost", "response_output_cost"):
            table.add_column(sa.Column(name, _COST, nullable=False, server_default="0"))
        table.add_column(sa.Column("gpu_ms", sa.Double(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("usage_rollup") as table:
        for name in (
            "gpu_ms",
            "response_output_cost",
            "response_input_cost",
            "response_completion_tokens",
            "response_prompt_tokens",
        ):
            table.drop_column(name)
    with op.batch_alter_table("price") as table:
        table.drop_column("response_output_per_mtok")
        table.drop_column("response_input_per_mtok")
