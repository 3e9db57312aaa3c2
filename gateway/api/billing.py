"""The admin API's money routes: prices, usage, invoices and finance exports.

Prices are the operator's; usage, invoices and exports are open to a tenant's admin key for
its own tenant only (a ``tenant`` parameter naming another is a 404, like a missing one).
The dead letters (usage events the ledger could not take) are the operator's.
"""

from __future__ import annotations

import base64
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import msgspec
from litestar import Controller, Request, Response, get, put
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery
from litestar.response import Stream

from billing import export as exports
from billing.deadletter import DeadLetter
from billing.invoices import build_invoice, invoice_to_dict, period_bounds
from billing.ledger import PriceConflict
from billing.pricing import TokenClass
from gateway.api import openapi as docs
from gateway.api._generation import json_response
from gateway.api._shapes import DeadLetterList, Invoice, PriceList, UsageReport
from gateway.api._shapes import Price as PriceBody
from gateway.api.admin import caller, operator_only, require_admin
from gateway.api.schemas import decode
from gateway.auth import Principal
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.services import Services

__all__ = ["BillingController"]


class PricePut(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """USD per million tokens, as decimal strings (a JSON number is read from its text, never
    through a float); embedding models use ``input_per_mtok``."""

    input_per_mtok: Decimal
    cached_input_per_mtok: Decimal | None = None
    output_per_mtok: Decimal = Decimal(0)
    #: Prompt tokens of an answer from the response cache; default the cached input price.
    response_input_per_mtok: Decimal | None = None
    #: Output tokens of an answer from the response cache; default free.
    response_output_per_mtok: Decimal = Decimal(0)
    #: When this version starts (RFC 3339 with a zone, or unix seconds); default now.
    effective_from: datetime | int | None = None


def _price_body(price: Any) -> dict[str, Any]:
    return {
        "object": "price",
        "id": price.id,
        "model": price.model,
        "input_per_mtok": f"{price.input_per_mtok:f}",
        "cached_input_per_mtok": f"{price.cached_input_per_mtok:f}",
        "output_per_mtok": f"{price.output_per_mtok:f}",
        "response_input_per_mtok": f"{price.per_mtok(TokenClass.RESPONSE_INPUT):f}",
        "response_output_per_mtok": f"{price.response_output_per_mtok:f}",
        "effective_from": price.effective_from.isoformat(),
    }


#: The most dead letters one listing returns.
_MAX_DEAD_LETTERS = 1000


def _dead_letter_body(letter: DeadLetter) -> dict[str, Any]:
    return {
        "seq": letter.seq,
        "event_id": letter.event_id,
        "source": letter.source,
        "error": letter.error,
        "created_at": letter.created_at.isoformat(),
        "payload": base64.b64encode(letter.payload).decode("ascii"),
    }


def _day(value: str | None, param: str, default: date) -> date:
    if value is None:
        return default
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{param} must be a date (YYYY-MM-DD).", param=param) from None


def _moment(value: str | None, param: str, default: datetime) -> datetime:
    """A date (midnight UTC) or an RFC 3339 time with a zone."""
    if value is None:
        return default
    try:
        if len(value) == 10:
            return datetime.combine(date.fromisoformat(value), time(), UTC)
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"{param} must be a date or an RFC 3339 time.", param=param) from None
    if moment.tzinfo is None:
        raise InvalidRequest(f"{param} needs a time zone.", param=param)
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # within a day of the years a datetime holds
        raise InvalidRequest(f"{param} is out of range.", param=param) from None


def _tenant_scope(principal: Principal, tenant: str | None) -> str | None:
    """The tenant a query may cover: any for the operator, its own for a tenant admin."""
    if principal.operator:
        if tenant is not None and "\x00" in tenant:  # no id holds one; PostgreSQL refuses it
            raise NotFound(f"No tenant with id '{tenant}'.", param="tenant")
        return tenant
    if tenant is not None and tenant != principal.tenant_id:
        raise NotFound(f"No tenant with id '{tenant}'.", param="tenant")
    return principal.tenant_id


_TENANT = {"tenant": {"description": "One tenant's id; a tenant admin's own by default."}}
_DAY = {"type": "string", "format": "date"}


class BillingController(Controller):
    path = "/admin/v1"
    guards = [require_admin]  # noqa: RUF012 (litestar reads it as a class attribute)

    @put(
        "/prices/{model:str}",
        operation_class=docs.operation(
            "setPrice",
            "Add a version of a model's price (operator only)",
            tag="Billing",
            body=PricePut,
            answers={200: docs.json(PriceBody, "The price version.")},
            errors=(400, 403, 409, 413),
            params={"model": {"description": "A model's name or alias."}},
        ),
    )
    async def put_price(
        self,
        model: FromPath[str],
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
    ) -> Response[bytes]:
        operator_only(caller(request), "set prices")
        found = services.host.catalog.resolve(model)
        if found is None:
            raise InvalidRequest(f"Unknown model `{model}`.", param="model")
        # Prices are kept under the model's own name, or an adapter's (``model:adapter``).
        base, adapter = found
        priced = f"{base.name}:{adapter.name}" if adapter is not None else base.name
        body = decode(await request.body(), PricePut)
        try:
            if isinstance(body.effective_from, int):
                effective = datetime.fromtimestamp(body.effective_from, UTC)
            elif body.effective_from is not None:
                if body.effective_from.tzinfo is None:
                    raise InvalidRequest(
                        "effective_from needs a time zone.", param="effective_from"
                    )
                effective = body.effective_from.astimezone(UTC)
            else:
                effective = datetime.now(UTC)
        except (OverflowError, OSError, ValueError):  # beyond the years a datetime holds
            raise InvalidRequest(
                "effective_from is out of range.", param="effective_from"
            ) from None
        cached = body.cached_input_per_mtok
        for field, value in msgspec.structs.asdict(body).items():
            if not isinstance(value, Decimal):
                continue
            if not value.is_finite() or value < 0:
                raise InvalidRequest(f"{field} must be a non-negative amount.", param=field)
            try:
                exact = value == value.quantize(Decimal("0.000001"))
            except InvalidOperation:  # more digits than a decimal context holds
                raise InvalidRequest(f"{field} is too large.", param=field) from None
            if not exact:
                raise InvalidRequest(f"{field} may have at most 6 decimals.", param=field)
        try:
            price = await services.usage.ledger.set_price(
                priced,
                input_per_mtok=body.input_per_mtok,
                cached_input_per_mtok=body.input_per_mtok if cached is None else cached,
                output_per_mtok=body.output_per_mtok,
                effective_from=effective,
                response_input_per_mtok=body.response_input_per_mtok,
                response_output_per_mtok=body.response_output_per_mtok,
            )
        except PriceConflict as exc:
            raise Conflict(str(exc), param="effective_from") from None
        except ValueError as exc:  # an amount with more integer digits than prices keep
            raise InvalidRequest(str(exc)) from None
        await services.usage.refresh()
        return json_response(_price_body(price))

    @get(
        "/prices",
        operation_class=docs.operation(
            "listPrices",
            "List every price version",
            tag="Billing",
            answers={200: docs.json(PriceList, "The price versions, by model and start.")},
            errors=(403,),
        ),
    )
    async def list_prices(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services]
    ) -> Response[bytes]:
        caller(request)
        prices = await services.usage.ledger.prices()
        return json_response({"object": "list", "data": [_price_body(p) for p in prices]})

    @get(
        "/usage",
        operation_class=docs.operation(
            "retrieveUsage",
            "Requests, tokens and cost per model, day or key",
            tag="Billing",
            answers={200: docs.json(UsageReport, "The usage.")},
            errors=(400, 403, 404),
            params={
                **_TENANT,
                "start": {"description": "The first day; the month's first by default.", **_DAY},
                "end": {"description": "The day after the last; tomorrow by default.", **_DAY},
            },
        ),
    )
    async def usage(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
        tenant: FromQuery[str | None] = None,
        start: FromQuery[str | None] = None,
        end: FromQuery[str | None] = None,
        group_by: FromQuery[Literal["model", "day", "key"]] = "day",
    ) -> Response[bytes]:
        scope = _tenant_scope(caller(request), tenant)
        today = datetime.now(UTC).date()
        first = _day(start, "start", today.replace(day=1))
        last = _day(end, "end", today + timedelta(days=1))
        rows = await services.usage.ledger.usage(
            tenant_id=scope, start=first, end=last, group_by=group_by
        )
        data = [
            {k: (f"{v:f}" if isinstance(v, Decimal) else v) for k, v in row.items()} for row in rows
        ]
        return json_response(
            {
                "object": "list",
                "tenant": scope,
                "start": first.isoformat(),
                "end": last.isoformat(),
                "group_by": group_by,
                "data": data,
            }
        )

    @get(
        "/billing/invoices",
        operation_class=docs.operation(
            "retrieveInvoice",
            "A tenant's invoice for one month",
            tag="Billing",
            answers={200: docs.json(Invoice, "The invoice.")},
            errors=(400, 403, 404),
            params={
                "tenant": {"description": "The tenant's id (required of the operator)."},
                "period": {
                    "description": "The month, `YYYY-MM`; this month by default.",
                    "pattern": "^[0-9]{4}-[0-9]{2}$",
                },
            },
        ),
    )
    async def invoices(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
        tenant: FromQuery[str | None] = None,
        period: FromQuery[str | None] = None,
    ) -> Response[bytes]:
        scope = _tenant_scope(caller(request), tenant)
        if scope is None:
            raise InvalidRequest("tenant is required.", param="tenant")
        if period is None:
            period = datetime.now(UTC).strftime("%Y-%m")
        try:
            start, end = period_bounds(period)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="period") from None
        try:
            tenant_row = await services.accounts.get_tenant(scope)
        except LookupError:
            raise NotFound(f"No tenant with id '{scope}'.", param="tenant") from None
        rows = await services.usage.ledger.invoice_rows(scope, start, end)
        device_ms = await services.usage.ledger.device_ms(scope, start, end)
        devices = await services.usage.ledger.device_rows(scope, start, end)
        invoice = build_invoice(scope, tenant_row.name, period, rows, device_ms, devices)
        return json_response(invoice_to_dict(invoice))

    @get(
        "/billing/export",
        operation_class=docs.operation(
            "exportUsage",
            "Every usage event of a period, as a file",
            tag="Billing",
            answers={
                200: docs.binary(
                    "The events: CSV, JSON lines, Parquet or FOCUS (CSV).",
                    ["text/csv", "application/x-ndjson", "application/vnd.apache.parquet"],
                    **docs.ATTACHMENT,
                )
            },
            errors=(400, 403, 404),
            params={
                **_TENANT,
                "start": {"description": "A date (midnight UTC) or an RFC 3339 time."},
                "end": {"description": "A date (midnight UTC) or an RFC 3339 time; default now."},
            },
        ),
    )
    async def export(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
        start: FromQuery[str | None] = None,
        end: FromQuery[str | None] = None,
        tenant: FromQuery[str | None] = None,
        format: FromQuery[Literal["csv", "jsonl", "parquet", "focus"]] = "csv",
    ) -> Stream:
        scope = _tenant_scope(caller(request), tenant)
        now = datetime.now(UTC)
        first = _moment(
            start, "start", now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        )
        last = _moment(end, "end", now)
        if last <= first:
            raise InvalidRequest("end must be after start.", param="end")
        names = {t.id: t.name for t in await services.accounts.list_tenants()}
        prices = {p.id: p for p in await services.usage.ledger.prices()}
        events = services.usage.ledger.iter_events(start=first, end=last, tenant_id=scope)
        chunks = exports.export(events, format, tenant_names=names, prices=prices)
        name = exports.filename(format, first, last, scope)
        return Stream(
            chunks,  # a plain iterator: litestar pulls it in a worker thread
            media_type=exports.media_type(format),
            headers={"content-disposition": f'attachment; filename="{name}"'},
        )

    @get(
        "/billing/dead-letters",
        operation_class=docs.operation(
            "listDeadLetters",
            "Usage events the ledger could not take (operator only)",
            tag="Billing",
            answers={200: docs.json(DeadLetterList, "The dead letters, newest first.")},
            errors=(400, 403),
            params={"limit": {"description": "How many to list.", "minimum": 1, "maximum": 1000}},
        ),
    )
    async def dead_letters(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
        limit: FromQuery[int] = 100,
    ) -> Response[bytes]:
        operator_only(caller(request), "read the dead letters")
        if not 1 <= limit <= _MAX_DEAD_LETTERS:
            raise InvalidRequest(f"limit must be between 1 and {_MAX_DEAD_LETTERS}.", param="limit")
        ledger = services.usage.ledger
        letters = await ledger.dead_letters(limit)
        total = await ledger.count_dead_letters()
        return json_response(
            {
                "object": "list",
                "data": [_dead_letter_body(letter) for letter in letters],
                "total": total,
            }
        )
