"""The JSON the routes answer with, as msgspec Structs: the OpenAPI document's response schemas.

The routes build their answers as plain dicts (or splice pre-encoded bytes on the streaming
hot path); these Structs only describe them, field for field, for `gateway.api.openapi`.
Fields without a default are always present; ``None`` in a type means the field is present
and may be null; a default of ``UNSET`` means the field may be absent. Every object is closed
(``forbid_unknown_fields``), so a field a route adds without describing it here fails the
schema test.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

from serving import EngineStats

__all__ = [
    "ApiKey",
    "ApiKeyList",
    "ChatCompletion",
    "ChatCompletionChunk",
    "Completion",
    "CompletionChunk",
    "CreateEmbeddingResponse",
    "DeadLetterList",
    "DeletedTenant",
    "ErrorResponse",
    "Health",
    "Invoice",
    "Model",
    "ModelList",
    "NewApiKey",
    "Price",
    "PriceList",
    "Quota",
    "Readiness",
    "Tenant",
    "TenantList",
    "UsageReport",
]

#: USD as a decimal string, never a float.
Money = Annotated[str, Meta(pattern=r"^[0-9]+(\.[0-9]+)?$", examples=["0.000125"])]
Count = Annotated[int, Meta(ge=0)]
#: Unix seconds.
Timestamp = Annotated[int, Meta(ge=0)]
#: A token's log-probability; null where it is minus infinity (a token that cannot be sampled).
Logprob = float | None
FinishReason = Literal["stop", "length"]


class _Closed(Struct, forbid_unknown_fields=True):
    pass


# Errors


class ErrorDetail(_Closed):
    message: str
    type: str
    #: The request field at fault, when there is one.
    param: str | None
    code: str | None


class ErrorResponse(_Closed):
    """OpenAI's error object."""

    error: ErrorDetail


# Usage


class PromptTokensDetails(_Closed):
    #: Prompt tokens served from the engine's prefix cache.
    cached_tokens: Count


class CompletionTokensDetails(_Closed):
    reasoning_tokens: Count


class CompletionUsage(_Closed):
    prompt_tokens: Count
    completion_tokens: Count
    total_tokens: Count
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails
    #: Engine milliseconds the answer took: its share of the engine's steps (device time;
    #: CPU time on a CPU engine). Zero for an answer from the response cache.
    gpu_ms: Annotated[float, Meta(ge=0)]


class StreamUsage(CompletionUsage):
    """The usage of a streamed answer's last chunk, with its cost as the receipt."""

    cost_usd: Money | UnsetType = UNSET


# Chat completions


class TopLogprob(_Closed):
    token: str
    logprob: Logprob
    bytes: list[Annotated[int, Meta(ge=0, le=255)]]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Closed):
    content: list[TokenLogprob]
    refusal: None


class AssistantMessage(_Closed):
    role: Literal["assistant"]
    content: str
    refusal: None


class ChatChoice(_Closed):
    index: Count
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(_Closed):
    """A chat completion (``stream`` false)."""

    id: Annotated[str, Meta(pattern="^chatcmpl-")]
    object: Literal["chat.completion"]
    created: Timestamp
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage
    system_fingerprint: None


class ChatDelta(_Closed):
    #: In each choice's first event only.
    role: Literal["assistant"] | UnsetType = UNSET
    content: str | UnsetType = UNSET


class ChatChunkChoice(_Closed):
    index: Count
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Closed):
    """One event of a streamed chat completion."""

    id: Annotated[str, Meta(pattern="^chatcmpl-")]
    object: Literal["chat.completion.chunk"]
    created: Timestamp
    model: str
    system_fingerprint: None
    choices: list[ChatChunkChoice]
    #: With ``stream_options.include_usage`` only: null, but in the last chunk (whose
    #: ``choices`` is empty).
    usage: StreamUsage | UnsetType | None = UNSET


# Completions


class TextLogprobs(_Closed):
    tokens: list[str]
    token_logprobs: list[Logprob]
    top_logprobs: list[dict[str, Logprob]]
    text_offset: list[Count]


class TextChoice(_Closed):
    index: Count
    text: str
    logprobs: TextLogprobs | None
    finish_reason: FinishReason


class Completion(_Closed):
    """A text completion (``stream`` false)."""

    id: Annotated[str, Meta(pattern="^cmpl-")]
    object: Literal["text_completion"]
    created: Timestamp
    model: str
    choices: list[TextChoice]
    usage: CompletionUsage
    system_fingerprint: None


class TextChunkChoice(_Closed):
    index: Count
    text: str
    logprobs: TextLogprobs | None
    finish_reason: FinishReason | None


class CompletionChunk(_Closed):
    """One event of a streamed text completion."""

    id: Annotated[str, Meta(pattern="^cmpl-")]
    object: Literal["text_completion"]
    created: Timestamp
    model: str
    system_fingerprint: None
    choices: list[TextChunkChoice]
    usage: StreamUsage | UnsetType | None = UNSET


# Embeddings


class Embedding(_Closed):
    object: Literal["embedding"]
    index: Count
    #: Floats, or their little-endian float32 bytes in base64 (``encoding_format: base64``).
    embedding: list[float] | str


class EmbeddingUsage(_Closed):
    prompt_tokens: Count
    total_tokens: Count


class CreateEmbeddingResponse(_Closed):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# Models


class Model(_Closed):
    id: str
    object: Literal["model"]
    created: Timestamp
    owned_by: str


class ModelList(_Closed):
    object: Literal["list"]
    data: list[Model]


# Health


class Health(_Closed):
    status: Literal["ok"]


class Readiness(_Closed):
    """Each engine's state and scheduler figures; 200 only when every engine is ready."""

    status: Literal["ready", "starting", "recovering", "failed"]
    models: dict[str, EngineStats]
    #: Why start-up failed for good (``status`` is ``failed``).
    error: str | UnsetType = UNSET


# Admin: tenants, keys, quotas


class Tenant(_Closed):
    id: str
    object: Literal["organization.tenant"]
    name: str
    created_at: Timestamp


class TenantList(_Closed):
    object: Literal["list"]
    data: list[Tenant]


class DeletedTenant(_Closed):
    id: str
    object: Literal["organization.tenant"]
    deleted: Literal[True]


class ApiKey(_Closed):
    id: str
    object: Literal["organization.api_key"]
    tenant_id: str
    name: str
    role: Literal["user", "admin"]
    #: The models the key may use; null for every model.
    models: list[str] | None
    redacted_value: str
    created_at: Timestamp
    expires_at: Timestamp | None
    revoked_at: Timestamp | None


class NewApiKey(ApiKey):
    """A key as created: its ``value`` is in this answer only."""

    value: Annotated[str, Meta(pattern="^tg_[0-9A-Za-z]+$")]


class ApiKeyList(_Closed):
    object: Literal["list"]
    data: list[ApiKey]


class Quota(_Closed):
    """A quota policy; null is unlimited."""

    object: Literal["organization.quota"]
    tenant_id: str
    #: Null for the tenant's own policy.
    key_id: str | None
    rpm: Count | None
    tpm: Count | None
    max_concurrency: Count | None
    daily_tokens: Count | None
    monthly_tokens: Count | None
    monthly_spend_usd: Money | None


# Admin: money


class Price(_Closed):
    """One version of a model's price, USD per million tokens."""

    object: Literal["price"]
    id: int
    model: str
    input_per_mtok: Money
    cached_input_per_mtok: Money
    output_per_mtok: Money
    response_input_per_mtok: Money
    response_output_per_mtok: Money
    effective_from: datetime


class PriceList(_Closed):
    object: Literal["list"]
    data: list[Price]


class UsageRow(_Closed, kw_only=True):
    """One group: its ``model``, ``day`` or ``key_id`` (as ``group_by`` says)."""

    model: str | UnsetType = UNSET
    day: date | UnsetType = UNSET
    #: Null for usage without a key.
    key_id: str | UnsetType | None = UNSET
    requests: Count
    prompt_tokens: Count
    cached_tokens: Count
    completion_tokens: Count
    cost_usd: Money
    #: Engine milliseconds (device time; CPU time on a CPU engine).
    gpu_ms: float


class UsageReport(_Closed):
    object: Literal["list"]
    #: Null when the operator asked for every tenant.
    tenant: str | None
    start: date
    end: date
    group_by: Literal["model", "day", "key"]
    data: list[UsageRow]


class InvoiceLine(_Closed):
    model: str
    token_class: Literal["input", "cached_input", "output", "response_input", "response_output"]
    description: str
    unit_price_per_mtok: Money
    quantity: Count
    amount_usd: Money


class InvoiceDeviceLine(_Closed):
    model: str
    #: The device kind (``cpu``, ``cuda``, ...); null where it was not named.
    device: str | None
    description: str
    unit_price_per_hour: Money
    #: Device-seconds.
    seconds: Annotated[float, Meta(ge=0)]
    amount_usd: Money


class Invoice(_Closed):
    """A tenant's invoice for one calendar month (UTC)."""

    tenant_id: str
    tenant_name: str
    period: Annotated[str, Meta(pattern=r"^[0-9]{4}-[0-9]{2}$")]
    period_start: datetime
    period_end: datetime
    currency: Literal["USD"]
    lines: list[InvoiceLine]
    total_usd: Money
    exact_total_usd: Money
    #: Engine time per model in the period (device-seconds; CPU seconds on a CPU engine).
    device_seconds: dict[str, Annotated[float, Meta(ge=0)]]
    #: Engine time per model, device kind and rate, priced at the rate; part of the total.
    device_lines: list[InvoiceDeviceLine]


class DeadLetter(_Closed):
    seq: int
    event_id: str | None
    source: Literal["redis", "sql"]
    error: str
    created_at: datetime
    #: The raw outbox payload, base64.
    payload: Annotated[str, Meta(pattern="^[A-Za-z0-9+/]*={0,2}$")]


class DeadLetterList(_Closed):
    object: Literal["list"]
    data: list[DeadLetter]
    #: How many dead letters the ledger holds.
    total: Count


# The serving policy


class CacheSettings(_Closed):
    enabled: bool
    ttl_s: float
    max_mb: float
    shared_models: list[str]


class QueueSettings(_Closed):
    slots: int | UnsetType = UNSET
    max_queued: int | UnsetType = UNSET


class ShareSettings(_Closed):
    weight: float | UnsetType = UNSET
    priority: Literal["interactive", "batch"] | UnsetType = UNSET
    isolate_prefix: bool | UnsetType = UNSET


class ServingPolicyBody(_Closed):
    """The serving policy in force, every default filled in."""

    object: Literal["serving_policy"]
    version: int
    cache: CacheSettings
    #: The default of every engine's queue, as set (empty: each engine's own).
    queue: QueueSettings
    #: Each generation model's queue in force.
    models: dict[str, QueueSettings]
    tenants: dict[str, ShareSettings]
    keys: dict[str, ShareSettings]
