"""The usage event: one per request that reached the gateway, priced, written once.

The event id is the request id, made by the gateway, so writing an event twice (a redelivery
from the outbox after a crash) is a no-op in the ledger.
"""

from __future__ import annotations

import enum
from datetime import datetime
from decimal import Decimal

import msgspec

__all__ = ["CacheTier", "EventStatus", "UsageEvent", "decode_event", "encode_event"]


class CacheTier(enum.StrEnum):
    """Where the answer came from: computed in full, a cached prompt prefix, a cached answer."""

    NONE = "none"
    PREFIX = "prefix"
    RESPONSE = "response"


class EventStatus(enum.StrEnum):
    OK = "ok"
    #: The request failed after admission (engine error, invalid prompt found late).
    ERROR = "error"
    #: The client went away; billed exactly the tokens the engine produced until then.
    ABORTED = "aborted"
    #: Refused by a quota (429) or because quotas could not be checked (503).
    REJECTED = "rejected"


class UsageEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One request's usage and cost. Money is ``Decimal`` (a string on the wire)."""

    id: str
    occurred_at: datetime
    tenant_id: str
    key_id: str | None
    model: str
    operation: str
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cache_tier: CacheTier = CacheTier.NONE
    status: EventStatus = EventStatus.OK
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    gpu_ms: float | None = None
    #: The kind of device that served it (``cpu``, ``cuda``, ``rocm``, ...); ``None`` when
    #: no device did (a response-cache answer, a refusal).
    device: str | None = None
    #: What an hour of that device costs, in USD, as its host declares it; prices ``gpu_ms``.
    device_hour_usd: Decimal | None = None
    #: ``gpu_ms`` at ``device_hour_usd`` (`billing.pricing.device_cost`); part of ``cost_usd``.
    device_cost_usd: Decimal = Decimal(0)
    #: Exact cost in USD, tokens and device time (not rounded; invoices round once per line
    #: item).
    cost_usd: Decimal = Decimal(0)
    #: The price version the event was rated with; ``None`` when the model had no price.
    price_id: int | None = None


_encoder = msgspec.json.Encoder(decimal_format="string")
_decoder = msgspec.json.Decoder(UsageEvent)


def encode_event(event: UsageEvent) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes) -> UsageEvent:
    return _decoder.decode(data)
