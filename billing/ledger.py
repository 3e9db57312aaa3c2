"""The usage ledger: every usage event once, its daily rollups, the price versions, and the
dead letters (`billing.deadletter`: outbox entries it could not take).

Writing events is idempotent: an event whose id is stored already is skipped, and only the
events actually inserted are added to the rollups, in the same transaction, so a redelivered
batch changes nothing. Usage reports and invoices read the rollups (one row per tenant, key,
model, UTC day and price version), never the events; exports stream the events. A rollup
counts the cached tokens that are prompt tokens (at most an event's ``prompt_tokens``), as
rating does, so its token sums give the billed quantity of every class.

The coroutines run their transaction on a worker thread (`asyncio.to_thread`) over the
synchronous engine they were given (psycopg 3 or sqlite3). On SQLite, where money is decimal
text, sums go through two SQL functions the ledger installs on the connection it uses
(`billing.tables.ExactSum`), so that no amount ever goes through a binary float.

Exceptions::

    LedgerError           base of the ledger's own errors
    ├── InvalidEvent      an event the ledger cannot store (also a ValueError); fix the producer
    └── PriceConflict     a different price of that model already starts at that instant

Invalid prices raise `ValueError` or `TypeError` (see `billing.pricing.Price`); a database
that is down raises SQLAlchemy's `OperationalError` as it is.
"""

from __future__ import annotations

import asyncio
import decimal
import logging
import math
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Literal, TypeVar, cast

import msgspec
from sqlalchemy import Connection, CursorResult, Engine, Table, bindparam, func, select, true
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from billing.deadletter import (
    DeadLetter,
    Rejected,
    Source,
    count_dead_letters,
    read_dead_letters,
    store_dead_letters,
)
from billing.events import UsageEvent
from billing.invoices import DeviceRow, InvoiceRow
from billing.pricing import (
    EXACT_CONTEXT,
    Price,
    PriceBook,
    TokenClass,
    class_amounts,
    quantities,
    sum_quantities,
)
from billing.tables import (
    COST_PLACES,
    COST_PRECISION,
    NO_DEVICE,
    NO_KEY,
    NO_PRICE,
    PRICE_PLACES,
    PRICE_PRECISION,
    ExactAdd,
    ExactSum,
    device_rollup,
    event_from_row,
    event_row,
    install_sqlite_functions,
    price,
    price_from_row,
    to_exact,
    usage_event,
    usage_rollup,
    utcnow,
)

__all__ = ["GroupBy", "InvalidEvent", "Ledger", "LedgerError", "PriceConflict", "check_event"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
#: What `Ledger.usage` groups by.
GroupBy = Literal["model", "day", "key"]
_INT64_MAX = 2**63 - 1
#: The range of ``usage_event.price_id`` (an ``INTEGER``).
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
#: The longest value of each string column of ``usage_event``.
_LENGTHS = {
    "id": 64,
    "tenant_id": 32,
    "key_id": 32,
    "model": 200,
    "operation": 32,
    "device": 64,
}
_COUNTS = ("prompt_tokens", "cached_tokens", "completion_tokens")
_RESPONSE_COUNTS = ("response_prompt_tokens", "response_completion_tokens")
_CLASS_COSTS = {
    TokenClass.INPUT: "input_cost",
    TokenClass.CACHED_INPUT: "cached_input_cost",
    TokenClass.OUTPUT: "output_cost",
    TokenClass.RESPONSE_INPUT: "response_input_cost",
    TokenClass.RESPONSE_OUTPUT: "response_output_cost",
}
#: The rollup columns an upsert adds to, in the order `_roll_up` sums them.
_SUMS = ("requests", *_COUNTS, *_RESPONSE_COUNTS, *_CLASS_COSTS.values(), "cost_usd", "gpu_ms")
_ROLLUP_KEY = ("tenant_id", "key_id", "model", "day", "price_id")
_DEVICE_KEY = ("tenant_id", "key_id", "model", "day", "device", "hour_usd")
_DEVICE_SUMS = ("requests", "gpu_ms", "cost_usd")
_GROUP_COLUMNS = {"model": "model", "day": "day", "key": "key_id"}


class LedgerError(Exception):
    """Base of the ledger's own errors."""


class InvalidEvent(LedgerError, ValueError):
    """An event the ledger cannot store (a naive time, a negative count, an inexact cost)."""


class PriceConflict(LedgerError):
    """A different price of the model already starts at that instant; versions never change."""


def check_event(event: UsageEvent) -> None:
    """Checks that the ledger can store ``event`` as it is.

    Raises:
        InvalidEvent: a string is empty (the id), too long or holds a NUL character (which
            PostgreSQL cannot store), the time is naive, a count is negative or too large,
            the price id is out of range, or the cost is not an exact non-negative `Decimal`
            with at most 12 places.
    """
    if not event.id:
        raise InvalidEvent("a usage event needs an id")
    for name, length in _LENGTHS.items():
        value = getattr(event, name)
        if value is not None and len(value) > length:
            raise InvalidEvent(f"event {event.id[:64]!r}: {name} is longer than {length}")
        if value is not None and "\x00" in value:
            raise InvalidEvent(f"event {event.id!r}: {name} holds a NUL character")
    if event.occurred_at.utcoffset() is None:
        raise InvalidEvent(f"event {event.id!r}: occurred_at is naive")
    for name in _COUNTS:
        count = getattr(event, name)
        if not isinstance(count, int) or not 0 <= count <= _INT64_MAX:
            raise InvalidEvent(f"event {event.id!r}: {name} is not a count: {count!r}")
    for name in ("latency_ms", "ttft_ms", "gpu_ms"):
        value = getattr(event, name)
        if value is not None and not math.isfinite(value):
            raise InvalidEvent(f"event {event.id!r}: {name} is not finite")
    if event.price_id is not None and not _INT32_MIN <= event.price_id <= _INT32_MAX:
        raise InvalidEvent(f"event {event.id!r}: price_id is out of range: {event.price_id!r}")
    amounts = (
        ("cost_usd", COST_PRECISION, COST_PLACES),
        ("device_cost_usd", COST_PRECISION, COST_PLACES),
        ("device_hour_usd", PRICE_PRECISION, PRICE_PLACES),
    )
    for name, precision, places in amounts:
        value = getattr(event, name)
        if value is None and name == "device_hour_usd":  # engine time with no rate
            continue
        try:
            exact = to_exact(value, precision, places)
        except (TypeError, ValueError) as exc:
            raise InvalidEvent(f"event {event.id!r}: {name}: {exc}") from None
        if exact < 0:
            raise InvalidEvent(f"event {event.id!r}: {name} is negative")
    if event.device_cost_usd > event.cost_usd:
        raise InvalidEvent(f"event {event.id!r}: device_cost_usd is more than cost_usd")


class Ledger:
    """Usage events, their rollups and the price book, in one SQL database.

    Args:
        engine: A synchronous engine on a database migrated to the newest revision. The
            ledger does not dispose of it: whoever made it does.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._sqlite = engine.dialect.name == "sqlite"
        self._insert = sqlite_insert if self._sqlite else postgresql_insert
        # Price versions never change once written, so a cache never goes stale.
        self._price_cache: dict[int, Price] = {}
        self._insert_events = (
            self._bulk_insert(usage_event)
            .on_conflict_do_nothing(index_elements=["id"])
            .returning(usage_event.c.id)
        )
        rollups = self._bulk_insert(usage_rollup)
        self._upsert_rollups = rollups.on_conflict_do_update(
            index_elements=list(_ROLLUP_KEY),
            set_={name: self._add(usage_rollup.c[name], rollups.excluded[name]) for name in _SUMS},
        )
        devices = self._bulk_insert(device_rollup)
        self._upsert_devices = devices.on_conflict_do_update(
            index_elements=list(_DEVICE_KEY),
            set_={
                name: self._add(device_rollup.c[name], devices.excluded[name])
                for name in _DEVICE_SUMS
            },
        )

    def _bulk_insert(self, table: Table) -> Any:
        """An INSERT of many rows that `_execute_bulk` runs.

        PostgreSQL: one statement over one array per column (``INSERT ... SELECT FROM
        unnest(...)``), whatever the number of rows: a statement with a placeholder per value
        would cost more to parse than to run. SQLite: rows of an ``executemany``.
        """
        if self._sqlite:
            return sqlite_insert(table)
        names = [column.name for column in table.columns]
        arrays = [bindparam(column.name, type_=ARRAY(column.type)) for column in table.columns]
        rows = func.unnest(*arrays).table_valued(*names).render_derived(name="new")
        return postgresql_insert(table).from_select(names, select(*(rows.c[n] for n in names)))

    def _execute_bulk(
        self, connection: Connection, statement: Any, rows: list[dict[str, Any]]
    ) -> CursorResult[Any]:
        if self._sqlite:
            return connection.execute(statement, rows)
        return connection.execute(
            statement, {name: [row[name] for row in rows] for name in rows[0]}
        )

    @property
    def engine(self) -> Engine:
        """The engine the ledger runs on."""
        return self._engine

    async def _run(self, work: Callable[[Connection], _T]) -> _T:
        def run() -> _T:
            with self._engine.begin() as connection:
                _install_functions(connection)
                return work(connection)

        return await asyncio.to_thread(run)

    # Events

    async def record(self, events: Iterable[UsageEvent]) -> int:
        """Stores the events not stored yet and adds them to the rollups, in one transaction.

        Returns:
            How many of the events were new.

        Raises:
            InvalidEvent: an event cannot be stored; nothing of the batch is.
        """
        batch = list(events)
        return await self._run(lambda connection: self.record_sync(connection, batch))

    def record_sync(self, bind: Connection | Session, events: Iterable[UsageEvent]) -> int:
        """`record` inside the caller's transaction, which the caller commits or rolls back.

        Args:
            bind: A connection or session with a transaction begun (or to be begun).
            events: The events; ids already stored, or repeated in ``events``, count once.

        Returns:
            How many of the events were new.

        Raises:
            InvalidEvent: an event cannot be stored.
        """
        connection = bind.connection() if isinstance(bind, Session) else bind
        unique: dict[str, UsageEvent] = {}
        for event in events:
            check_event(event)
            unique.setdefault(event.id, event)
        if not unique:
            return 0
        _install_functions(connection)
        # Sorted, so that concurrent writers take their row locks in one order (no deadlock).
        # The insert comes first: on SQLite the transaction then holds the write lock from
        # its first statement on, and never has to upgrade a read snapshot.
        rows = [event_row(unique[event_id]) for event_id in sorted(unique)]
        inserted = set(self._execute_bulk(connection, self._insert_events, rows).scalars())
        if inserted:
            self._roll_up(connection, [unique[event_id] for event_id in sorted(inserted)])
        return len(inserted)

    def _roll_up(self, connection: Connection, events: list[UsageEvent]) -> None:
        prices = self._prices_by_id(
            connection, {e.price_id for e in events if e.price_id is not None}
        )
        groups: dict[tuple[str, str, str, date, int], list[Any]] = {}
        device_groups: dict[tuple[str, str, str, date, str, Decimal], list[Any]] = {}
        unknown: list[str] = []
        misrated: list[str] = []
        with decimal.localcontext(EXACT_CONTEXT):
            for event in events:
                version = None if event.price_id is None else prices.get(event.price_id)
                amounts = class_amounts(
                    version,
                    event.prompt_tokens,
                    event.cached_tokens,
                    event.completion_tokens,
                    event.cache_tier,
                )
                if event.price_id is not None and version is None:
                    unknown.append(event.id)
                elif sum(amounts.values()) != event.cost_usd - event.device_cost_usd:
                    misrated.append(event.id)
                day = event.occurred_at.astimezone(UTC).date()
                key = (
                    event.tenant_id,
                    event.key_id or NO_KEY,
                    event.model,
                    day,
                    NO_PRICE if event.price_id is None else event.price_id,
                )
                if event.gpu_ms or event.device_cost_usd:
                    # The usage key's tenant, key, model and day, then device and rate.
                    device_key = (
                        *key[:4],
                        event.device or NO_DEVICE,
                        event.device_hour_usd or Decimal(0),
                    )
                    device_sums = device_groups.setdefault(device_key, [0, 0.0, Decimal(0)])
                    device_sums[0] += 1
                    device_sums[1] += event.gpu_ms or 0.0
                    device_sums[2] += event.device_cost_usd
                sums = groups.get(key)
                if sums is None:
                    costs = len(_CLASS_COSTS) + 1
                    sums = groups[key] = [0] * 6 + [Decimal(0)] * costs + [0.0]
                counts = quantities(
                    event.prompt_tokens,
                    event.cached_tokens,
                    event.completion_tokens,
                    event.cache_tier,
                )
                sums[0] += 1
                sums[1] += event.prompt_tokens
                # Cached tokens are prompt tokens: any excess is no token of the request.
                sums[2] += counts[TokenClass.CACHED_INPUT] + counts[TokenClass.RESPONSE_INPUT]
                sums[3] += event.completion_tokens
                sums[4] += counts[TokenClass.RESPONSE_INPUT]
                sums[5] += counts[TokenClass.RESPONSE_OUTPUT]
                for index, token_class in enumerate(_CLASS_COSTS, start=6):
                    sums[index] += amounts[token_class]
                sums[-2] += event.cost_usd
                sums[-1] += event.gpu_ms or 0.0
        rows = [
            {
                **dict(zip(_ROLLUP_KEY, key, strict=True)),
                **dict(zip(_SUMS, sums, strict=True)),
            }
            for key, sums in sorted(groups.items())
        ]
        self._execute_bulk(connection, self._upsert_rollups, rows)
        if device_groups:
            device_rows = [
                {
                    **dict(zip(_DEVICE_KEY, key, strict=True)),
                    **dict(zip(_DEVICE_SUMS, sums, strict=True)),
                }
                for key, sums in sorted(device_groups.items())
            ]
            self._execute_bulk(connection, self._upsert_devices, device_rows)
        if unknown:
            logger.warning(
                "%d usage events name a price version the ledger does not have (first: %s); "
                "their costs count, their split by token class does not",
                len(unknown),
                ", ".join(unknown[:5]),
            )
        if misrated:
            logger.warning(
                "%d usage events cost other than their price version rates them (first: %s); "
                "their costs count, their split by token class follows the price",
                len(misrated),
                ", ".join(misrated[:5]),
            )

    def _add(self, left: Any, right: Any) -> ColumnElement[Any]:
        if left.name in ("requests", *_COUNTS, *_RESPONSE_COUNTS, "gpu_ms"):  # not money
            added: ColumnElement[Any] = left + right
            return added
        return ExactAdd(left, right)

    def iter_events(
        self,
        *,
        start: datetime,
        end: datetime,
        tenant_id: str | None = None,
        batch: int = 5000,
    ) -> Iterator[UsageEvent]:
        """The events from ``start`` (inclusive) to ``end`` (exclusive), oldest first.

        Streams them ``batch`` rows at a time (a server-side cursor on PostgreSQL), so any
        number of events takes little memory. A synchronous generator: run it on a thread.

        Args:
            start: The first instant, timezone-aware.
            end: The instant after the last, timezone-aware.
            tenant_id: Only this tenant's events; every tenant's when ``None``.
            batch: Rows fetched at a time.
        """
        query = (
            select(usage_event)
            .where(*_event_filter(start, end, tenant_id))
            .order_by(usage_event.c.occurred_at, usage_event.c.id)
        )
        with self._engine.connect() as connection:
            result = connection.execution_options(yield_per=batch).execute(query)
            for row in result:
                yield event_from_row(row._mapping)

    async def count_events(
        self,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        tenant_id: str | None = None,
    ) -> int:
        """How many events there are from ``start`` to ``end`` (either open when ``None``)."""
        query = select(func.count()).select_from(usage_event)
        query = query.where(*_event_filter(start, end, tenant_id))
        return await self._run(lambda connection: int(connection.execute(query).scalar_one()))

    async def sum_cost(
        self,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        tenant_id: str | None = None,
    ) -> Decimal:
        """The exact cost of the events from ``start`` to ``end`` (either open when ``None``)."""
        query = select(ExactSum(usage_event.c.cost_usd)).where(
            *_event_filter(start, end, tenant_id)
        )

        def work(connection: Connection) -> Decimal:
            total = connection.execute(query).scalar_one()
            return Decimal(0) if total is None else Decimal(total)

        return await self._run(work)

    # Dead letters

    async def dead_letter(self, source: Source, rejected: Iterable[Rejected]) -> int:
        """Stores outbox entries the ledger could not take, in one transaction.

        Args:
            source: The outbox kind they came from.
            rejected: The entries, each with its raw payload and the reason.

        Returns:
            How many were stored.
        """
        entries = list(rejected)
        if not entries:
            return 0
        return await self._run(lambda connection: store_dead_letters(connection, source, entries))

    def dead_letter_sync(
        self, bind: Connection | Session, source: Source, rejected: Iterable[Rejected]
    ) -> int:
        """`dead_letter` inside the caller's transaction, which the caller commits or rolls back."""
        connection = bind.connection() if isinstance(bind, Session) else bind
        return store_dead_letters(connection, source, rejected)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The newest ``limit`` dead letters, newest first.

        Raises:
            ValueError: ``limit`` is less than 1.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        return await self._run(lambda connection: read_dead_letters(connection, limit))

    async def count_dead_letters(self) -> int:
        """How many dead letters the ledger holds."""
        return await self._run(count_dead_letters)

    # Reports

    async def usage(
        self,
        *,
        tenant_id: str | None,
        start: date,
        end: date,
        group_by: GroupBy,
    ) -> list[dict[str, Any]]:
        """Requests, tokens and cost per model, UTC day or key, from the rollups.

        Args:
            tenant_id: One tenant's usage, or every tenant's when ``None``.
            start: The first day (inclusive); a datetime must be a UTC midnight.
            end: The day after the last (exclusive); likewise.
            group_by: ``"model"``, ``"day"`` or ``"key"``.

        Returns:
            One dict per group, ordered by it: the group's value under ``model``, ``day`` (a
            `date`) or ``key_id`` (``None`` for usage without a key), then ``requests``,
            ``prompt_tokens``, ``cached_tokens``, ``completion_tokens`` (ints) and
            ``cost_usd`` (an exact `Decimal`).

        Raises:
            ValueError: ``group_by`` is none of those, or a bound is not a day.
        """
        if group_by not in _GROUP_COLUMNS:
            raise ValueError(f"group_by must be model, day or key, not {group_by!r}")
        name = _GROUP_COLUMNS[group_by]
        group = usage_rollup.c[name]
        query = (
            select(
                group,
                *(func.sum(usage_rollup.c[column]) for column in ("requests", *_COUNTS)),
                ExactSum(usage_rollup.c.cost_usd),
                func.sum(usage_rollup.c.gpu_ms),
            )
            .where(*_rollup_filter(tenant_id, start, end))
            .group_by(group)
            .order_by(group)
        )

        def work(connection: Connection) -> list[dict[str, Any]]:
            report = []
            for row in connection.execute(query):
                value, requests, prompt, cached, completion, cost, gpu_ms = list(row)
                if name == "key_id" and value == NO_KEY:
                    value = None
                report.append(
                    {
                        name: value,
                        "requests": int(requests),
                        "prompt_tokens": int(prompt),
                        "cached_tokens": int(cached),
                        "completion_tokens": int(completion),
                        "cost_usd": Decimal(cost),
                        "gpu_ms": float(gpu_ms or 0.0),
                    }
                )
            return report

        return await self._run(work)

    async def device_ms(self, tenant_id: str, start: date, end: date) -> dict[str, float]:
        """A tenant's engine milliseconds per model between two days (as `invoice_rows`).

        Raises:
            ValueError: a bound is not a day.
        """
        query = (
            select(usage_rollup.c.model, func.sum(usage_rollup.c.gpu_ms))
            .where(*_rollup_filter(tenant_id, start, end))
            .group_by(usage_rollup.c.model)
        )

        def work(connection: Connection) -> dict[str, float]:
            return {model: float(ms or 0.0) for model, ms in connection.execute(query)}

        return await self._run(work)

    async def device_rows(self, tenant_id: str, start: date, end: date) -> list[DeviceRow]:
        """A tenant's engine time per model, device kind and device rate between two days
        (as `invoice_rows`), with its exact cost, for `build_invoice`.

        Raises:
            ValueError: a bound is not a day.
        """
        table = device_rollup
        group = (table.c.model, table.c.device, table.c.hour_usd)
        query = (
            select(*group, func.sum(table.c.requests), func.sum(table.c.gpu_ms))
            .add_columns(ExactSum(table.c.cost_usd))
            .where(*_rollup_filter(tenant_id, start, end, table))
            .group_by(*group)
            .order_by(*group)
        )

        def work(connection: Connection) -> list[DeviceRow]:
            return [
                DeviceRow(
                    model=model,
                    device=device or None,
                    hour_usd=Decimal(hour_usd),
                    requests=int(requests),
                    gpu_ms=float(ms or 0.0),
                    amount=Decimal(cost),
                )
                for model, device, hour_usd, requests, ms, cost in connection.execute(query)
            ]

        return await self._run(work)

    async def invoice_rows(self, tenant_id: str, start: date, end: date) -> list[InvoiceRow]:
        """A tenant's usage per model, price version and token class, for `build_invoice`.

        ``quantity`` is the tokens of the class, ``amount`` the exact sum of the events'
        costs of the class, ``unit_price`` the version's price (zero for usage that had no
        price, whose ``price_id`` is ``None``). Classes with no tokens are left out.

        Args:
            tenant_id: The tenant.
            start: The first day (inclusive); a datetime must be a UTC midnight, as
                `billing.invoices.period_bounds` gives.
            end: The day after the last (exclusive); likewise.

        Raises:
            ValueError: a bound is not a day.
        """
        sums = [usage_rollup.c[column] for column in (*_COUNTS, *_RESPONSE_COUNTS)]
        costs = [usage_rollup.c[column] for column in _CLASS_COSTS.values()]
        units = [
            price.c.input_per_mtok,
            price.c.cached_input_per_mtok,
            price.c.output_per_mtok,
            price.c.response_input_per_mtok,
            price.c.response_output_per_mtok,
        ]
        query = (
            select(
                usage_rollup.c.model,
                usage_rollup.c.price_id,
                *units,
                *(func.sum(column) for column in sums),
                *(ExactSum(column) for column in costs),
            )
            .select_from(usage_rollup.outerjoin(price, price.c.id == usage_rollup.c.price_id))
            .where(*_rollup_filter(tenant_id, start, end))
            .group_by(usage_rollup.c.model, usage_rollup.c.price_id, *units)
            .order_by(usage_rollup.c.model, usage_rollup.c.price_id)
        )

        def work(connection: Connection) -> list[InvoiceRow]:
            rows = []
            for row in connection.execute(query):
                model, price_id = row[0], row[1]
                unit, counted, amounts = list(row[2:7]), row[7:12], row[12:17]
                if unit[3] is None:  # the response-cache input price defaults to cached input
                    unit[3] = unit[1]
                counts = sum_quantities(*(int(n) for n in counted))
                for token_class, unit_price, amount in zip(
                    _CLASS_COSTS, unit, amounts, strict=True
                ):
                    if counts[token_class] == 0 and not Decimal(amount):
                        continue
                    rows.append(
                        InvoiceRow(
                            model=model,
                            token_class=token_class,
                            price_id=None if price_id == NO_PRICE else price_id,
                            unit_price=Decimal(0) if unit_price is None else unit_price,
                            quantity=counts[token_class],
                            amount=Decimal(amount),
                        )
                    )
            return rows

        return await self._run(work)

    # Prices

    async def set_price(
        self,
        model: str,
        input_per_mtok: Decimal,
        cached_input_per_mtok: Decimal,
        output_per_mtok: Decimal,
        effective_from: datetime,
        *,
        response_input_per_mtok: Decimal | None = None,
        response_output_per_mtok: Decimal = Decimal(0),
    ) -> Price:
        """Adds a version of ``model``'s price, in USD per million tokens, from ``effective_from``.

        Setting the very same version again returns the stored one (a repeated ``PUT``).

        Raises:
            PriceConflict: a different version of the model starts at ``effective_from``.
            ValueError: a price is negative or has more than 6 places or 12 integer digits,
                the model is empty or longer than 200 characters, or the time is naive.
            TypeError: a price is not a `Decimal`.
        """
        if len(model) > _LENGTHS["model"]:
            raise ValueError(f"a model name has at most {_LENGTHS['model']} characters")
        checked = Price(
            id=0,
            model=model,
            input_per_mtok=input_per_mtok,
            cached_input_per_mtok=cached_input_per_mtok,
            output_per_mtok=output_per_mtok,
            effective_from=effective_from,
            response_input_per_mtok=response_input_per_mtok,
            response_output_per_mtok=response_output_per_mtok,
        )
        for amount in (
            input_per_mtok,
            cached_input_per_mtok,
            output_per_mtok,
            response_input_per_mtok,
            response_output_per_mtok,
        ):
            if amount is not None:
                to_exact(amount, PRICE_PRECISION, PRICE_PLACES)
        wanted = msgspec.structs.replace(checked, effective_from=effective_from.astimezone(UTC))
        values = {
            "model": model,
            "input_per_mtok": wanted.input_per_mtok,
            "cached_input_per_mtok": wanted.cached_input_per_mtok,
            "output_per_mtok": wanted.output_per_mtok,
            "response_input_per_mtok": wanted.response_input_per_mtok,
            "response_output_per_mtok": wanted.response_output_per_mtok,
            "effective_from": wanted.effective_from,
            "created_at": utcnow(),
        }
        statement = (
            self._insert(price)
            .values(values)
            .on_conflict_do_nothing(index_elements=["model", "effective_from"])
            .returning(price.c.id)
        )

        def work(connection: Connection) -> Price:
            price_id = connection.execute(statement).scalar()
            if price_id is not None:
                return msgspec.structs.replace(wanted, id=price_id)
            existing = price_from_row(
                connection.execute(
                    select(price).where(
                        price.c.model == model, price.c.effective_from == wanted.effective_from
                    )
                )
                .one()
                ._mapping
            )
            if _same_amounts(existing, wanted):
                return existing
            raise PriceConflict(
                f"{model!r} has a different price from {wanted.effective_from.isoformat()}; "
                "a price version never changes: add one with a later effective_from"
            )

        stored = await self._run(work)
        self._price_cache[stored.id] = stored
        return stored

    async def prices(self, model: str | None = None) -> list[Price]:
        """Every price version (of ``model`` only when given), by model and start."""
        query = select(price).order_by(price.c.model, price.c.effective_from)
        if model is not None:
            query = query.where(price.c.model == model)

        def work(connection: Connection) -> list[Price]:
            return [price_from_row(row._mapping) for row in connection.execute(query)]

        versions = await self._run(work)
        self._price_cache.update((version.id, version) for version in versions)
        return versions

    async def price_book(self) -> PriceBook:
        """Every price version, as a `PriceBook`."""
        return PriceBook(await self.prices())

    def _prices_by_id(self, connection: Connection, ids: set[int]) -> dict[int, Price]:
        missing = ids - self._price_cache.keys()
        if missing:
            query = select(price).where(price.c.id.in_(sorted(missing)))
            for row in connection.execute(query):
                version = price_from_row(row._mapping)
                self._price_cache[version.id] = version
        return {
            price_id: self._price_cache[price_id] for price_id in ids & self._price_cache.keys()
        }


def _same_amounts(a: Price, b: Price) -> bool:
    def amounts(p: Price) -> tuple[Decimal | None, ...]:
        return (
            p.input_per_mtok,
            p.cached_input_per_mtok,
            p.output_per_mtok,
            p.response_input_per_mtok,
            p.response_output_per_mtok,
        )

    return amounts(a) == amounts(b)


def _event_filter(
    start: datetime | None, end: datetime | None, tenant_id: str | None
) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = [true()]
    if start is not None:
        conditions.append(usage_event.c.occurred_at >= start)
    if end is not None:
        conditions.append(usage_event.c.occurred_at < end)
    if tenant_id is not None:
        conditions.append(usage_event.c.tenant_id == tenant_id)
    return conditions


def _rollup_filter(
    tenant_id: str | None, start: date, end: date, table: Table = usage_rollup
) -> list[ColumnElement[bool]]:
    conditions = [table.c.day >= _day(start), table.c.day < _day(end)]
    if tenant_id is not None:
        conditions.append(table.c.tenant_id == tenant_id)
    return conditions


def _day(value: date) -> date:
    """``value`` as a day: a `date`, or a datetime at a UTC midnight."""
    if not isinstance(value, datetime):
        return value
    if value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: give it a timezone (UTC)")
    utc = value.astimezone(UTC)
    if utc.time() != datetime.min.time():
        raise ValueError(f"{value.isoformat()} is not a UTC midnight: usage is kept per day")
    return utc.date()


def _install_functions(connection: Connection) -> None:
    """The exact money functions on a SQLite connection (see `ExactSum`)."""
    if connection.dialect.name == "sqlite":
        raw = connection.connection.dbapi_connection
        assert raw is not None  # a connection in use has its driver's connection
        install_sqlite_functions(cast(sqlite3.Connection, raw))
