"""SQL column types that behave the same on SQLite and PostgreSQL, shared by every table.

Timestamps are timezone-aware UTC (`UTCDateTime`); money is an exact `Decimal`
(`ExactDecimal`): ``NUMERIC`` on PostgreSQL, its decimal text on SQLite, which would
otherwise turn ``NUMERIC`` values into binary floats. `NAMING_CONVENTION` names constraints
and indexes alike in every metadata the migrations manage.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Context, Decimal, InvalidOperation
from typing import Any

from sqlalchemy import DateTime, Dialect, Numeric, String
from sqlalchemy.types import TypeDecorator, TypeEngine

__all__ = ["NAMING_CONVENTION", "WIDE", "ExactDecimal", "UTCDateTime", "to_exact", "utcnow"]

#: Room for every digit a column holds: quantizing never rounds or fails for lack of it.
WIDE = Context(prec=60)

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


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


class ExactDecimal(TypeDecorator[Decimal]):
    """An exact `Decimal` with ``scale`` places: ``NUMERIC(precision, scale)``, text on SQLite.

    Floats are refused on the way in, and so are values with more places or more digits than
    the column holds: nothing is rounded silently. On SQLite the text is plain positional
    notation (``"0.000000"``, never ``"0E-6"``).
    """

    impl = Numeric
    cache_ok = True

    def __init__(self, precision: int, scale: int) -> None:
        super().__init__(precision, scale, asdecimal=True)
        self.precision = precision
        self.scale = scale

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            # The sign, the digits and the point.
            return dialect.type_descriptor(String(self.precision + 2))
        return dialect.type_descriptor(self.impl_instance)

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        exact = to_exact(value, self.precision, self.scale)
        return format(exact, "f") if dialect.name == "sqlite" else exact

    def process_result_value(self, value: Any, dialect: Dialect) -> Decimal | None:
        if value is None:
            return None
        return Decimal(value).quantize(Decimal(1).scaleb(-self.scale), context=WIDE)


def to_exact(value: object, precision: int, scale: int) -> Decimal:
    """``value`` with exactly ``scale`` places, checked to fit ``precision`` digits.

    Raises:
        TypeError: ``value`` is not a `Decimal` (floats are never accepted).
        ValueError: it is not finite, has more than ``scale`` places or more than
            ``precision - scale`` integer digits.
    """
    if not isinstance(value, Decimal):
        raise TypeError(f"an exact amount must be a Decimal, not {type(value).__name__}")
    if not value.is_finite():
        raise ValueError(f"an exact amount must be finite, not {value}")
    try:
        exact = value.quantize(Decimal(1).scaleb(-scale), context=WIDE)
    except InvalidOperation:
        exact = None
    if exact is None or exact != value or (exact and exact.adjusted() >= precision - scale):
        raise ValueError(f"{value} does not fit {precision - scale} digits and {scale} places")
    return exact
