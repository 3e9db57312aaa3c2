"""Column types that behave the same on SQLite and PostgreSQL: UTC timestamps and money."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy import DateTime, Dialect, Numeric, String
from sqlalchemy.types import TypeDecorator, TypeEngine

__all__ = ["MONEY_PLACES", "MONEY_PRECISION", "Money", "UTCDateTime", "to_money", "utcnow"]

#: Money columns hold up to 12 digits before the point and exactly 6 after it.
MONEY_PRECISION = 18
MONEY_PLACES = 6
_MONEY_QUANTUM = Decimal(1).scaleb(-MONEY_PLACES)
#: Room for the sign, 12 digits, the point and 6 places.
MONEY_SQLITE_LENGTH = 32


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    PostgreSQL stores ``timestamptz``; SQLite has no timezones, so values are stored as naive
    UTC and made aware again when read. Naive datetimes are refused on the way in.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: give it a timezone (UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Money(TypeDecorator[Decimal]):
    """An exact `Decimal` amount with 6 places: ``NUMERIC(18, 6)``, or text on SQLite.

    SQLite would turn a ``NUMERIC`` value into a binary float, so there the amount is kept as
    its decimal text. Floats are refused on the way in, and so are amounts with more places
    or more digits than the column holds (nothing is rounded silently).
    """

    impl = Numeric(MONEY_PRECISION, MONEY_PLACES, asdecimal=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(MONEY_SQLITE_LENGTH))
        return dialect.type_descriptor(self.impl_instance)

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        amount = to_money(value)
        return str(amount) if dialect.name == "sqlite" else amount

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        return Decimal(value).quantize(_MONEY_QUANTUM)


def to_money(value: object) -> Decimal:
    """``value`` as an amount with exactly 6 places.

    Raises:
        TypeError: ``value`` is not a `Decimal` (floats are never accepted).
        ValueError: it is not finite, has more than 6 places or more than 12 integer digits.
    """
    if not isinstance(value, Decimal):
        raise TypeError(f"money must be a Decimal, not {type(value).__name__}")
    if not value.is_finite():
        raise ValueError(f"money must be finite, not {value}")
    try:
        amount = value.quantize(_MONEY_QUANTUM)
    except InvalidOperation:
        amount = None
    if amount is None or amount != value or amount.adjusted() >= MONEY_PRECISION - MONEY_PLACES:
        raise ValueError(
            f"{value} does not fit {MONEY_PRECISION - MONEY_PLACES} digits "
            f"and {MONEY_PLACES} places"
        )
    return amount
