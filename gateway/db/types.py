"""Column types that behave the same on SQLite and PostgreSQL: UTC timestamps and money.

The mechanics are billing's (`billing.sqltypes`); accounts money has 6 places.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import Dialect, String
from sqlalchemy.types import TypeEngine

from billing.sqltypes import ExactDecimal, UTCDateTime, to_exact, utcnow

__all__ = ["MONEY_PLACES", "MONEY_PRECISION", "Money", "UTCDateTime", "to_money", "utcnow"]

#: Money columns hold up to 12 digits before the point and exactly 6 after it.
MONEY_PRECISION = 18
MONEY_PLACES = 6
#: Room for the sign, 12 digits, the point and 6 places.
MONEY_SQLITE_LENGTH = 32


class Money(ExactDecimal):
    """An exact `Decimal` amount with 6 places: ``NUMERIC(18, 6)``, or text on SQLite.

    Floats are refused on the way in, and so are amounts with more places or more digits
    than the column holds (nothing is rounded silently).
    """

    cache_ok = True

    def __init__(self) -> None:
        super().__init__(MONEY_PRECISION, MONEY_PLACES)

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":  # the width migration 0001 gave the column
            return dialect.type_descriptor(String(MONEY_SQLITE_LENGTH))
        return super().load_dialect_impl(dialect)


def to_money(value: object) -> Decimal:
    """``value`` as an amount with exactly 6 places.

    Raises:
        TypeError: ``value`` is not a `Decimal` (floats are never accepted).
        ValueError: it is not finite, has more than 6 places or more than 12 integer digits.
    """
    return to_exact(value, MONEY_PRECISION, MONEY_PLACES)
