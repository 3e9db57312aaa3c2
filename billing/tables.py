"""The billing tables: price versions, usage events, their daily rollups, the SQL outbox and
the dead letters.

Billing keeps a `metadata` of its own, apart from the accounts tables, and no foreign key
into them: ``tenant_id`` and ``key_id`` are plain strings, so usage outlives the tenants and
keys it names. The migrations ``0002_billing`` and ``0003_dead_letters`` create exactly these
tables; a test compares the two.

The tables are SQLAlchemy Core tables, not mapped classes: the ledger reads and writes them
in bulk statements (thousands of rows at once) and never needs an object per row.

Money is an exact `Decimal` on every backend (`ExactDecimal`): ``NUMERIC`` on PostgreSQL,
its decimal text on SQLite, which would otherwise turn ``NUMERIC`` values into binary floats.
Sums and additions of money in SQL go through `ExactSum` and `ExactAdd`: plain ``sum`` and
``+`` on PostgreSQL, and on SQLite two functions that add the texts as `Decimal` values, which
`install_sqlite_functions` puts on a connection. Every timestamp is a timezone-aware UTC
datetime (`UTCDateTime`).
"""

from __future__ import annotations

import sqlite3
from decimal import Decimal, localcontext
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Date,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    UniqueConstraint,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement

from billing.events import CacheTier, EventStatus, UsageEvent
from billing.pricing import Price
from billing.sqltypes import NAMING_CONVENTION, WIDE, ExactDecimal, UTCDateTime, to_exact, utcnow

__all__ = [
    "COST_PLACES",
    "COST_PRECISION",
    "NO_DEVICE",
    "NO_KEY",
    "NO_PRICE",
    "PRICE_PLACES",
    "PRICE_PRECISION",
    "ExactAdd",
    "ExactDecimal",
    "ExactSum",
    "UTCDateTime",
    "device_rollup",
    "event_from_row",
    "event_row",
    "install_sqlite_functions",
    "metadata",
    "outbox",
    "price",
    "price_from_row",
    "to_exact",
    "usage_dead_letter",
    "usage_event",
    "usage_rollup",
    "utcnow",
]

#: Prices per million tokens: 12 digits before the point, 6 after.
PRICE_PRECISION = 18
PRICE_PLACES = 6
#: Costs: 18 digits before the point, 12 after (a token count times a price, divided by a
#: million, is exact with 12 places).
COST_PRECISION = 30
COST_PLACES = 12
#: ``usage_rollup.key_id`` of usage made without a key (primary key columns cannot be NULL).
NO_KEY = ""
#: ``usage_rollup.price_id`` of usage that had no price.
NO_PRICE = -1
#: ``device_rollup.device`` of engine time whose device was not named.
NO_DEVICE = ""


_ID = String(32)
_EVENT_ID = String(64)
_MODEL = String(200)
_DEVICE = String(64)

#: The tables the migrations manage, named as the accounts tables are.
metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _price() -> ExactDecimal:
    return ExactDecimal(PRICE_PRECISION, PRICE_PLACES)


def _cost() -> ExactDecimal:
    return ExactDecimal(COST_PRECISION, COST_PLACES)


#: A model's prices from ``effective_from`` on, per million tokens of each class. A version
#: is never changed once written: events name the version they were rated with.
price = Table(
    "price",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", _MODEL, nullable=False),
    Column("input_per_mtok", _price(), nullable=False),
    Column("cached_input_per_mtok", _price(), nullable=False),
    Column("output_per_mtok", _price(), nullable=False),
    # An answer from the response cache: NULL input means the cached input price.
    Column("response_input_per_mtok", _price(), nullable=True),
    Column("response_output_per_mtok", _price(), nullable=False, server_default="0"),
    Column("effective_from", UTCDateTime, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # Its index also serves lookups by model alone (the leading column).
    UniqueConstraint("model", "effective_from"),
)

#: One row per request, written once (the id is the request id); the source of every export.
usage_event = Table(
    "usage_event",
    metadata,
    Column("id", _EVENT_ID, primary_key=True),
    Column("occurred_at", UTCDateTime, nullable=False),
    Column("tenant_id", _ID, nullable=False),
    Column("key_id", _ID, nullable=True),
    Column("model", _MODEL, nullable=False),
    Column("operation", String(32), nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("cached_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("cache_tier", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("latency_ms", Double, nullable=False),
    Column("ttft_ms", Double, nullable=True),
    Column("gpu_ms", Double, nullable=True),
    Column("device", _DEVICE, nullable=True),
    Column("device_hour_usd", _price(), nullable=True),
    Column("device_cost_usd", _cost(), nullable=False, server_default="0"),
    Column("cost_usd", _cost(), nullable=False),
    Column("price_id", Integer, nullable=True),
    Index("ix_usage_event_occurred_at", "occurred_at"),
    Index("ix_usage_event_tenant_id_occurred_at", "tenant_id", "occurred_at"),
)

#: The sums of the events of one tenant, key, model, UTC day and price version: what usage
#: reports and invoices read, never the events themselves.
usage_rollup = Table(
    "usage_rollup",
    metadata,
    Column("tenant_id", _ID, nullable=False),
    Column("key_id", _ID, nullable=False),
    Column("model", _MODEL, nullable=False),
    Column("day", Date, nullable=False),
    Column("price_id", Integer, nullable=False),
    Column("requests", BigInteger, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("cached_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("input_cost", _cost(), nullable=False),
    Column("cached_input_cost", _cost(), nullable=False),
    Column("output_cost", _cost(), nullable=False),
    # Answers from the response cache: their tokens (also counted in the three counts above,
    # prompt tokens as cached) and their costs.
    Column("response_prompt_tokens", BigInteger, nullable=False, server_default="0"),
    Column("response_completion_tokens", BigInteger, nullable=False, server_default="0"),
    Column("response_input_cost", _cost(), nullable=False, server_default="0"),
    Column("response_output_cost", _cost(), nullable=False, server_default="0"),
    Column("cost_usd", _cost(), nullable=False),
    #: Engine milliseconds of the events (device time; CPU time on a CPU engine).
    Column("gpu_ms", Double, nullable=False, server_default="0"),
    PrimaryKeyConstraint("tenant_id", "key_id", "model", "day", "price_id"),
    # Reports over every tenant select by day alone.
    Index("ix_usage_rollup_day", "day"),
)

#: The engine time of the events of one tenant, key, model, UTC day, device kind and
#: device rate, and what it cost: the device lines of invoices. Its costs are also in
#: ``usage_rollup.cost_usd`` (which sums whole events) and in none of its class costs.
device_rollup = Table(
    "device_rollup",
    metadata,
    Column("tenant_id", _ID, nullable=False),
    Column("key_id", _ID, nullable=False),
    Column("model", _MODEL, nullable=False),
    Column("day", Date, nullable=False),
    Column("device", _DEVICE, nullable=False),
    #: USD per device-hour (zero where the device declared none).
    Column("hour_usd", _price(), nullable=False),
    Column("requests", BigInteger, nullable=False),
    Column("gpu_ms", Double, nullable=False),
    Column("cost_usd", _cost(), nullable=False),
    PrimaryKeyConstraint("tenant_id", "key_id", "model", "day", "device", "hour_usd"),
    Index("ix_device_rollup_day", "day"),
)

#: Events on their way from the request path to the ledger (`billing.outbox.SqlOutbox`).
outbox = Table(
    "outbox",
    metadata,
    # SQLite: an INTEGER primary key is the rowid; AUTOINCREMENT never reuses a deleted one,
    # so a handle held by one consumer can never name a newer row.
    Column(
        "seq",
        BigInteger().with_variant(Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    Column("event_id", _EVENT_ID, nullable=False),
    #: The event as `billing.events.encode_event` makes it (JSON).
    Column("payload", LargeBinary, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    sqlite_autoincrement=True,
)

#: Outbox entries the ledger could not take (`billing.deadletter`): a payload that does not
#: decode, or an event the ledger refuses, kept as it was received.
usage_dead_letter = Table(
    "usage_dead_letter",
    metadata,
    Column(
        "seq",
        BigInteger().with_variant(Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    #: The event id as far as it can be read; ``NULL`` when the payload holds none.
    Column("event_id", _EVENT_ID, nullable=True),
    #: The outbox kind it came from: ``redis`` or ``sql``.
    Column("source", String(16), nullable=False),
    Column("payload", LargeBinary, nullable=False),
    #: The error class and a short message.
    Column("error", String(500), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    sqlite_autoincrement=True,
)


# Exact money arithmetic in SQL


class ExactSum(FunctionElement[Decimal]):
    """``sum`` of an `ExactDecimal` column, exact on SQLite too (NULL over no rows)."""

    name = "exact_sum"
    inherit_cache = True

    def __init__(self, column: ColumnElement[Decimal]) -> None:
        super().__init__(column)
        self.type = column.type


class ExactAdd(FunctionElement[Decimal]):
    """``left + right`` of `ExactDecimal` values, exact on SQLite too."""

    name = "exact_add"
    inherit_cache = True

    def __init__(self, left: ColumnElement[Decimal], right: ColumnElement[Decimal]) -> None:
        super().__init__(left, right)
        self.type = left.type


@compiles(ExactSum)
def _compile_sum(element: ExactSum, compiler: SQLCompiler, **kw: Any) -> str:
    return f"sum({compiler.process(element.clauses, **kw)})"


@compiles(ExactSum, "sqlite")
def _compile_sum_sqlite(element: ExactSum, compiler: SQLCompiler, **kw: Any) -> str:
    return f"tg_decimal_sum({compiler.process(element.clauses, **kw)})"


@compiles(ExactAdd)
def _compile_add(element: ExactAdd, compiler: SQLCompiler, **kw: Any) -> str:
    left, right = (compiler.process(clause, **kw) for clause in element.clauses)
    return f"({left} + {right})"


@compiles(ExactAdd, "sqlite")
def _compile_add_sqlite(element: ExactAdd, compiler: SQLCompiler, **kw: Any) -> str:
    return f"tg_decimal_add({compiler.process(element.clauses, **kw)})"


def install_sqlite_functions(connection: sqlite3.Connection) -> None:
    """Puts the functions `ExactSum` and `ExactAdd` use on SQLite on ``connection``."""
    connection.create_function("tg_decimal_add", 2, _decimal_add, deterministic=True)
    # typeshed types aggregates over integers only; these step over decimal text.
    connection.create_aggregate("tg_decimal_sum", 1, _DecimalSum)  # type: ignore[arg-type]


def _decimal_add(left: str | None, right: str | None) -> str | None:
    if left is None or right is None:
        return left if right is None else right
    with localcontext(WIDE):
        return format(Decimal(left) + Decimal(right), "f")


class _DecimalSum:
    """SQLite aggregate: the exact sum of decimal texts (``NULL`` over no rows, as ``sum``)."""

    def __init__(self) -> None:
        self.total: Decimal | None = None

    def step(self, value: str | None) -> None:
        if value is not None:
            with localcontext(WIDE):
                self.total = Decimal(value) + (self.total or 0)

    def finalize(self) -> str | None:
        return None if self.total is None else format(self.total, "f")


# Rows and the structs they hold


def event_row(event: UsageEvent) -> dict[str, Any]:
    """The ``usage_event`` row of ``event``."""
    return {
        "id": event.id,
        "occurred_at": event.occurred_at,
        "tenant_id": event.tenant_id,
        "key_id": event.key_id,
        "model": event.model,
        "operation": event.operation,
        "prompt_tokens": event.prompt_tokens,
        "cached_tokens": event.cached_tokens,
        "completion_tokens": event.completion_tokens,
        "cache_tier": event.cache_tier.value,
        "status": event.status.value,
        "latency_ms": event.latency_ms,
        "ttft_ms": event.ttft_ms,
        "gpu_ms": event.gpu_ms,
        "device": event.device,
        "device_hour_usd": event.device_hour_usd,
        "device_cost_usd": event.device_cost_usd,
        "cost_usd": event.cost_usd,
        "price_id": event.price_id,
    }


def event_from_row(row: Any) -> UsageEvent:
    """The event of a ``usage_event`` row (a mapping)."""
    return UsageEvent(
        id=row["id"],
        occurred_at=row["occurred_at"],
        tenant_id=row["tenant_id"],
        key_id=row["key_id"],
        model=row["model"],
        operation=row["operation"],
        prompt_tokens=int(row["prompt_tokens"]),
        cached_tokens=int(row["cached_tokens"]),
        completion_tokens=int(row["completion_tokens"]),
        cache_tier=CacheTier(row["cache_tier"]),
        status=EventStatus(row["status"]),
        latency_ms=row["latency_ms"],
        ttft_ms=row["ttft_ms"],
        gpu_ms=row["gpu_ms"],
        device=row["device"],
        device_hour_usd=row["device_hour_usd"],
        device_cost_usd=row["device_cost_usd"],
        cost_usd=row["cost_usd"],
        price_id=row["price_id"],
    )


def price_from_row(row: Any) -> Price:
    """The price version of a ``price`` row (a mapping)."""
    return Price(
        id=row["id"],
        model=row["model"],
        input_per_mtok=row["input_per_mtok"],
        cached_input_per_mtok=row["cached_input_per_mtok"],
        output_per_mtok=row["output_per_mtok"],
        effective_from=row["effective_from"],
        response_input_per_mtok=row["response_input_per_mtok"],
        response_output_per_mtok=row["response_output_per_mtok"],
    )
