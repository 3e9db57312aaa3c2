"""What crosses the wire between gateways and workers: the serving interface's own structs.

A generation call is a `GenerateCall`; the worker answers with newline-delimited JSON, one
`GenerationChunk` per line, or one `WireError` line when the engine fails (the HTTP status
is 200 once the stream has begun: the error travels in the stream, as in process it is
raised from the iterator). Embeddings are one `EmbedCall` and one `EmbeddingBatch` (or a
`WireError` with a 4xx/5xx status). Workers describe themselves in the registry with a
`WorkerInfo`.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from serving.engine import (
    EngineDead,
    EngineNotReady,
    GenerationChunk,
    InvalidPrompt,
    SamplingOptions,
    ServingError,
)
from serving.fairqueue import QueueFull, RequestContext

__all__ = [
    "EmbedCall",
    "GenerateCall",
    "ModelOnWorker",
    "TokenizeCall",
    "WireError",
    "WorkerInfo",
    "error_of",
    "raise_error",
]


class GenerateCall(msgspec.Struct, frozen=True):
    model: str
    prompt: list[int]
    options: SamplingOptions
    request_id: str
    stream: bool = True
    context: RequestContext = msgspec.field(default_factory=RequestContext)
    adapter: str | None = None


class EmbedCall(msgspec.Struct, frozen=True):
    model: str
    inputs: list[list[int]]
    request_id: str


class TokenizeCall(msgspec.Struct, frozen=True):
    model: str
    #: A text to tokenize, or chat messages (``(role, content)`` pairs) to render.
    text: str | None = None
    messages: list[tuple[str, str]] | None = None


ErrorKind = Literal["invalid", "not_ready", "queue_full", "dead", "unknown_model", "internal"]


class WireError(msgspec.Struct, frozen=True, tag="error", tag_field="type"):
    kind: ErrorKind
    message: str
    param: str | None = None
    too_long: bool = False
    retry_after_s: float | None = None


class ChunkLine(msgspec.Struct, frozen=True, tag="chunk", tag_field="type"):
    chunk: GenerationChunk


#: One line of a generation stream.
StreamLine = ChunkLine | WireError


def error_of(exc: BaseException) -> WireError:
    """The wire form of a serving error (anything else is ``internal``)."""
    if isinstance(exc, InvalidPrompt):
        return WireError("invalid", str(exc), exc.param, exc.too_long)
    if isinstance(exc, QueueFull):
        return WireError("queue_full", str(exc), retry_after_s=exc.retry_after_s)
    if isinstance(exc, EngineNotReady):
        return WireError("not_ready", str(exc), retry_after_s=exc.retry_after_s)
    if isinstance(exc, EngineDead):
        return WireError("dead", str(exc), retry_after_s=exc.retry_after_s)
    return WireError("internal", "the worker failed to serve the request")


def raise_error(error: WireError) -> ServingError:
    """The serving error a wire error stands for, to raise where the call was made."""
    if error.kind == "invalid":
        return InvalidPrompt(error.message, error.param, too_long=error.too_long)
    if error.kind == "queue_full":
        return QueueFull(error.message, retry_after_s=error.retry_after_s)
    if error.kind in ("not_ready", "unknown_model"):
        return EngineNotReady(error.message, retry_after_s=error.retry_after_s)
    return EngineDead(error.message, retry_after_s=error.retry_after_s)


class ModelOnWorker(msgspec.Struct):
    """One model of a worker's catalog as the worker's pool has it."""

    name: str
    state: str
    memory_gb: float
    inflight: int
    #: The catalog entry, as the models file would hold it (JSON of `ModelSpec`).
    spec: bytes
    #: Requests waiting in the model's admission queue, per priority class.
    queued: dict[str, int] = msgspec.field(default_factory=dict)
    kv_cache_usage: float = 0.0


class WorkerInfo(msgspec.Struct):
    """What a worker publishes in the registry at every heartbeat."""

    id: str
    url: str
    #: ``cpu``, ``cuda``, ``rocm``, or another vLLM platform's device type.
    device_kind: str
    #: What an hour of the device costs, in USD (a decimal string; ``"0"`` unknown).
    cost_per_hour: str
    budget_gb: float
    used_gb: float
    models: list[ModelOnWorker]
    #: Chain hashes of the prompt blocks it served lately (see `serving.router`), newest last.
    prefixes: list[str] = msgspec.field(default_factory=list)
    inflight: int = 0
    draining: bool = False
    started_at: float = 0.0
    heartbeat_at: float = 0.0
