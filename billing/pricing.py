"""The price book: versioned per-model token prices and exact rating of usage.

Prices are USD per million tokens, split in five token classes: prompt tokens the engine
computed, prompt tokens served from the prefix cache, output tokens, and the prompt and
output tokens of an answer served whole from the response cache (a hit, or a request that
shared another's generation); an embedding model prices its input tokens with
``input_per_mtok``. The response-cache prices default to the cached input price and free
output. A per-Mtok price has at most six decimals (a millionth of a dollar per
million tokens), so every cost is an exact multiple of ``1e-12`` USD: costs are never
rounded here, invoices round once per line item.

A model's price changes by adding a version with a later ``effective_from``; the version in
force at an instant is the latest one that starts at or before it, so an event at the exact
boundary instant belongs to the new version.

Errors: ``ValueError`` for an invalid price or token count, ``TypeError`` for a money value
that is not a ``Decimal``; ``decimal.Inexact`` would mean a computation that cannot be exact
and is never expected with validated prices.
"""

from __future__ import annotations

import bisect
import decimal
import enum
import itertools
import types
from collections.abc import Iterable, Mapping
from datetime import datetime
from decimal import Decimal

import msgspec

from billing.events import CacheTier, UsageEvent

__all__ = [
    "EXACT_CONTEXT",
    "PRICE_DECIMALS",
    "Price",
    "PriceBook",
    "TokenClass",
    "amounts_of",
    "class_amounts",
    "device_cost",
    "device_hours",
    "device_rate",
    "quantities",
    "rate",
    "rerate",
    "sum_quantities",
    "to_nano_usd",
]

#: The most decimals a per-Mtok price may carry.
PRICE_DECIMALS = 6

#: Decimal context for money: wide enough for any realistic amount, and any rounding raises
#: ``decimal.Inexact`` instead of silently losing a digit. Use it through
#: ``decimal.localcontext(EXACT_CONTEXT)``, which works on a copy.
EXACT_CONTEXT = decimal.Context(
    prec=60,
    rounding=decimal.ROUND_HALF_EVEN,
    traps=[decimal.Inexact, decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow],
)

#: For checks that look at a rounded value instead of raising on the rounding.
_LENIENT = decimal.Context(prec=EXACT_CONTEXT.prec, traps=[])
_PRICE_QUANTUM = Decimal(1).scaleb(-PRICE_DECIMALS)
_MTOK_EXPONENT = -6
_MS_PER_HOUR = Decimal(3_600_000)
_COST_QUANTUM = Decimal(1).scaleb(-12)
_NANO_EXPONENT = 9


class TokenClass(enum.StrEnum):
    """A class of tokens with its own unit price."""

    #: Prompt tokens computed by the engine (not served from the prefix cache).
    INPUT = "input"
    #: Prompt tokens served from the prefix cache.
    CACHED_INPUT = "cached_input"
    #: Generated tokens.
    OUTPUT = "output"
    #: Prompt tokens of an answer served from the response cache.
    RESPONSE_INPUT = "response_input"
    #: Output tokens of an answer served from the response cache.
    RESPONSE_OUTPUT = "response_output"


class Price(msgspec.Struct, frozen=True, kw_only=True):
    """One version of a model's price, in USD per million tokens of each class.

    Raises:
        ValueError: a price is negative, not finite or has more than six decimals; the
            model is empty; ``effective_from`` is naive.
        TypeError: a price is not a ``Decimal`` (a float is never accepted).
    """

    id: int
    model: str
    input_per_mtok: Decimal
    cached_input_per_mtok: Decimal
    output_per_mtok: Decimal
    #: First instant (inclusive) the version applies to; timezone-aware.
    effective_from: datetime
    #: Prompt tokens of a response-cache answer; ``None``: the cached input price.
    response_input_per_mtok: Decimal | None = None
    #: Output tokens of a response-cache answer (free unless set).
    response_output_per_mtok: Decimal = Decimal(0)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("a price needs a model name")
        if self.effective_from.utcoffset() is None:
            raise ValueError("effective_from must be timezone-aware (UTC)")
        for name in ("input_per_mtok", "cached_input_per_mtok", "output_per_mtok"):
            _check_price(name, getattr(self, name))
        if self.response_input_per_mtok is not None:
            _check_price("response_input_per_mtok", self.response_input_per_mtok)
        _check_price("response_output_per_mtok", self.response_output_per_mtok)

    def per_mtok(self, token_class: TokenClass) -> Decimal:
        """The USD price per million tokens of ``token_class``."""
        if token_class is TokenClass.INPUT:
            return self.input_per_mtok
        if token_class is TokenClass.CACHED_INPUT:
            return self.cached_input_per_mtok
        if token_class is TokenClass.RESPONSE_INPUT:
            if self.response_input_per_mtok is None:
                return self.cached_input_per_mtok
            return self.response_input_per_mtok
        if token_class is TokenClass.RESPONSE_OUTPUT:
            return self.response_output_per_mtok
        return self.output_per_mtok


def _check_price(name: str, value: object) -> None:
    if not isinstance(value, Decimal):
        raise TypeError(f"{name} must be a Decimal, got {type(value).__name__}")
    if not value.is_finite() or value < 0:
        raise ValueError(f"{name} must be a finite, non-negative amount, got {value}")
    quantized = value.quantize(_PRICE_QUANTUM, rounding=decimal.ROUND_DOWN, context=_LENIENT)
    if quantized.is_nan() or quantized != value:
        raise ValueError(f"{name} has more than {PRICE_DECIMALS} decimals or is too large: {value}")


def quantities(
    prompt_tokens: int,
    cached_tokens: int,
    completion_tokens: int,
    tier: CacheTier = CacheTier.NONE,
) -> dict[TokenClass, int]:
    """Split a request's token counts into billable quantities per class.

    Cached tokens are part of the prompt: ``input`` is ``prompt - cached`` and ``cached_input``
    is ``cached``, both capped so that together they never exceed the prompt. An answer from
    the response cache (``tier`` ``response``) puts its prompt and output tokens in the two
    response classes instead.

    Raises:
        ValueError: a count is negative.
    """
    if tier is CacheTier.RESPONSE:
        return sum_quantities(
            prompt_tokens, prompt_tokens, completion_tokens, prompt_tokens, completion_tokens
        )
    return sum_quantities(prompt_tokens, cached_tokens, completion_tokens, 0, 0)


def sum_quantities(
    prompt_tokens: int,
    cached_tokens: int,
    completion_tokens: int,
    response_prompt_tokens: int,
    response_completion_tokens: int,
) -> dict[TokenClass, int]:
    """Quantities per class of summed counts, where the response-cache answers' prompt tokens
    are counted in both ``prompt_tokens`` and ``cached_tokens`` and their output tokens in
    ``completion_tokens`` (as their events count them).

    Raises:
        ValueError: a count is negative.
    """
    counts = (
        prompt_tokens,
        cached_tokens,
        completion_tokens,
        response_prompt_tokens,
        response_completion_tokens,
    )
    if min(counts) < 0:
        raise ValueError(
            f"token counts must be non-negative: prompt={prompt_tokens} "
            f"cached={cached_tokens} completion={completion_tokens} "
            f"response prompt={response_prompt_tokens} "
            f"response completion={response_completion_tokens}"
        )
    response_prompt = min(response_prompt_tokens, prompt_tokens)
    cached = max(min(cached_tokens, prompt_tokens) - response_prompt, 0)
    response_completion = min(response_completion_tokens, completion_tokens)
    return {
        TokenClass.INPUT: prompt_tokens - response_prompt - cached,
        TokenClass.CACHED_INPUT: cached,
        TokenClass.OUTPUT: completion_tokens - response_completion,
        TokenClass.RESPONSE_INPUT: response_prompt,
        TokenClass.RESPONSE_OUTPUT: response_completion,
    }


def class_amounts(
    price: Price | None,
    prompt_tokens: int,
    cached_tokens: int,
    completion_tokens: int,
    tier: CacheTier = CacheTier.NONE,
) -> dict[TokenClass, Decimal]:
    """The exact USD amount per token class (all zero when ``price`` is ``None``).

    The amounts add up to :func:`rate` of the same arguments exactly.
    """
    counts = quantities(prompt_tokens, cached_tokens, completion_tokens, tier)
    return amounts_of(price, counts)


def amounts_of(price: Price | None, counts: Mapping[TokenClass, int]) -> dict[TokenClass, Decimal]:
    """The exact USD amount of each class's quantity under ``price``."""
    if price is None:
        return {cls: Decimal(0) for cls in counts}
    with decimal.localcontext(EXACT_CONTEXT):
        return {
            cls: (Decimal(quantity) * price.per_mtok(cls)).scaleb(_MTOK_EXPONENT)
            for cls, quantity in counts.items()
        }


def rate(
    price: Price | None,
    prompt_tokens: int,
    cached_tokens: int,
    completion_tokens: int,
    tier: CacheTier = CacheTier.NONE,
) -> Decimal:
    """The exact USD cost of one request's tokens, never rounded; zero without a price.

    Args:
        price: The price version in force when the request happened, or ``None``.
        prompt_tokens: Every prompt token, cached or not.
        cached_tokens: The prompt tokens served from the prefix cache.
        completion_tokens: Generated tokens (zero for embeddings).
        tier: ``response`` for an answer served from the response cache.

    Raises:
        ValueError: a count is negative.
    """
    amounts = class_amounts(price, prompt_tokens, cached_tokens, completion_tokens, tier)
    with decimal.localcontext(EXACT_CONTEXT):
        return sum(amounts.values(), Decimal(0))


class PriceBook:
    """Every price version of every model, answering which version applies when.

    Raises:
        ValueError: two versions share an id, or one model has two versions with the same
            ``effective_from``.
    """

    def __init__(self, prices: Iterable[Price]) -> None:
        by_id: dict[int, Price] = {}
        by_model: dict[str, list[Price]] = {}
        for price in prices:
            if price.id in by_id:
                raise ValueError(f"duplicate price id {price.id}")
            by_id[price.id] = price
            by_model.setdefault(price.model, []).append(price)
        self._by_id = types.MappingProxyType(by_id)
        self._versions: dict[str, tuple[Price, ...]] = {}
        self._starts: dict[str, list[datetime]] = {}
        for model, versions in by_model.items():
            versions.sort(key=lambda p: p.effective_from)
            starts = [p.effective_from for p in versions]
            for earlier, later in itertools.pairwise(starts):
                if earlier == later:
                    raise ValueError(f"two prices for {model!r} take effect at {later.isoformat()}")
            self._versions[model] = tuple(versions)
            self._starts[model] = starts

    @property
    def by_id(self) -> Mapping[int, Price]:
        """Every version by its id (read-only)."""
        return self._by_id

    def models(self) -> list[str]:
        """The models that have at least one price version, sorted."""
        return sorted(self._versions)

    def versions(self, model: str) -> tuple[Price, ...]:
        """A model's price versions, oldest first (empty for an unknown model)."""
        return self._versions.get(model, ())

    def price_at(self, model: str, when: datetime) -> Price | None:
        """The version of ``model``'s price in force at ``when``, or ``None`` before the first.

        An adapter (``model:adapter``) without a price of its own has its model's.

        Raises:
            ValueError: ``when`` is naive.
        """
        if when.utcoffset() is None:
            raise ValueError("price lookups need a timezone-aware instant")
        starts = self._starts.get(model)
        if not starts:
            base, sep, _adapter = model.rpartition(":")
            return self.price_at(base, when) if sep and base else None
        index = bisect.bisect_right(starts, when) - 1
        return self._versions[model][index] if index >= 0 else None

    def current(self, model: str, now: datetime) -> Price | None:
        """The version in force at ``now`` (the caller's clock)."""
        return self.price_at(model, now)


def device_rate(value: str | Decimal | None) -> Decimal | None:
    """A device's cost per hour in USD, checked as a price is (``None`` or empty: none).

    Raises:
        ValueError: not a decimal number, negative, not finite or with more than six
            decimals.
    """
    if value is None or value == "":
        return None
    try:
        amount = value if isinstance(value, Decimal) else Decimal(str(value).strip())
    except decimal.InvalidOperation:
        raise ValueError(
            f"a device cost per hour must be a decimal number, got {value!r}"
        ) from None
    _check_price("device cost per hour", amount)
    return amount


def device_cost(gpu_ms: float | None, per_hour: Decimal | None) -> Decimal:
    """The USD cost of ``gpu_ms`` engine milliseconds on a device at ``per_hour`` USD per
    hour, rounded half-even to 1e-12 USD (the ledger's precision); zero without either.

    Raises:
        ValueError: ``gpu_ms`` is negative or not finite.
    """
    if not gpu_ms or per_hour is None:
        return Decimal(0)
    ms = Decimal(repr(gpu_ms))
    if not ms.is_finite() or ms < 0:
        raise ValueError(f"engine time must be a finite, non-negative number, got {gpu_ms!r}")
    with decimal.localcontext(_LENIENT):
        cost = ms * per_hour / _MS_PER_HOUR
        return cost.quantize(_COST_QUANTUM, rounding=decimal.ROUND_HALF_EVEN)


def device_hours(gpu_ms: float) -> Decimal:
    """``gpu_ms`` engine milliseconds in device-hours, rounded half-even to 1e-12 hour."""
    with decimal.localcontext(_LENIENT):
        hours = Decimal(repr(gpu_ms)) / _MS_PER_HOUR
        return hours.quantize(_COST_QUANTUM, rounding=decimal.ROUND_HALF_EVEN)


def rerate(event: UsageEvent, book: PriceBook) -> UsageEvent:
    """The event priced again with the version in force at its ``occurred_at`` (its device
    time keeps its device's rate)."""
    price = book.price_at(event.model, event.occurred_at)
    cost = rate(
        price, event.prompt_tokens, event.cached_tokens, event.completion_tokens, event.cache_tier
    )
    with decimal.localcontext(EXACT_CONTEXT):
        cost += event.device_cost_usd
    return msgspec.structs.replace(
        event, cost_usd=cost, price_id=None if price is None else price.id
    )


def to_nano_usd(amount: Decimal) -> int:
    """``amount`` in nano-USD, rounded up (a reservation never under-holds).

    Raises:
        ValueError: ``amount`` is not finite.
    """
    if not amount.is_finite():
        raise ValueError(f"not a finite amount: {amount}")
    with decimal.localcontext(EXACT_CONTEXT):
        nanos = amount.scaleb(_NANO_EXPONENT).to_integral_value(rounding=decimal.ROUND_CEILING)
    return int(nanos)
