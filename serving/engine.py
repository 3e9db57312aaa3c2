"""What the serving layer offers: engines that generate text or embed it.

The interface knows models, prompts, sampling and batches; it knows nothing of tenants,
money or HTTP. :mod:`serving.vllm_engine` implements it on vLLM.

Exceptions::

    ServingError                 base of everything raised here
    ├── EngineNotReady           the engine is starting, restarting or stopped; retry later
    ├── EngineDead               the engine process died under the request; the supervisor
    │                            restarts it, so a later request may succeed
    └── InvalidPrompt            the request cannot be served as given (caller's fault)
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Literal

import msgspec

from serving.catalog import ModelSpec

if TYPE_CHECKING:
    from serving.fairqueue import RequestContext
    from serving.pool import ModelPool

__all__ = [
    "ChoiceDelta",
    "EmbeddingBatch",
    "EmbeddingEngine",
    "EngineDead",
    "EngineNotReady",
    "EngineState",
    "EngineStats",
    "GenerationChunk",
    "GenerationEngine",
    "InvalidPrompt",
    "ModelEngine",
    "ResponseFormat",
    "SamplingOptions",
    "ServingError",
    "TokenLogprob",
    "TopLogprob",
]

FinishReason = Literal["stop", "length", "abort", "error"]


class ServingError(Exception):
    """Base class of the serving layer's errors."""


class EngineNotReady(ServingError):
    """The engine is starting, restarting or shutting down; the same request may succeed later.

    ``retry_after_s`` estimates when it will be ready (``None`` when nothing is known).
    """

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineDead(ServingError):
    """The engine process died while the request ran; the engine is being restarted."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InvalidPrompt(ServingError):
    """The prompt or its options cannot be served; sending it again will not help."""

    def __init__(self, message: str, param: str | None = None, *, too_long: bool = False) -> None:
        super().__init__(message)
        self.param = param
        #: The prompt plus the requested output do not fit the model's context.
        self.too_long = too_long


class ResponseFormat(msgspec.Struct, frozen=True):
    """A constraint on the output: any JSON object, or JSON that matches a schema."""

    kind: Literal["json_object", "json_schema"]
    #: The JSON Schema, as JSON text (``json_schema`` only).
    schema: str | None = None


class SamplingOptions(msgspec.Struct, frozen=True):
    """Sampling knobs, named as the OpenAI API names them (plus vLLM's ``top_k``, ``min_p``,
    ``repetition_penalty`` and ``ignore_eos``)."""

    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: Number of alternatives to report per token; ``None`` asks for no logprobs at all.
    logprobs: int | None = None
    ignore_eos: bool = False
    #: Token id to a bias added to its logit, in [-100, 100].
    logit_bias: dict[int, float] | None = None
    response_format: ResponseFormat | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None


class TopLogprob(msgspec.Struct, array_like=True):
    token: str
    logprob: float


class TokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    top: list[TopLogprob]


class ChoiceDelta(msgspec.Struct):
    """New output of one choice since the previous chunk (or all of it, when not streaming)."""

    index: int
    text: str
    num_tokens: int
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None


class GenerationChunk(msgspec.Struct):
    choices: list[ChoiceDelta]
    prompt_tokens: int
    cached_tokens: int
    finished: bool
    #: Engine milliseconds this request has had so far (its share of the engine's steps,
    #: see `serving.metering`); ``None`` when the engine does not meter.
    engine_ms: float | None = None
    #: Milliseconds the request waited in the engine's admission queue.
    queue_ms: float = 0.0
    #: Milliseconds it waited for its model to be brought onto the device (0: resident).
    cold_start_ms: float = 0.0
    #: The kind of device that served it and what an hour of that device costs (USD, a
    #: decimal string), where a worker served it; ``None`` in process.
    device: str | None = None
    device_cost_per_hour: str | None = None


class EmbeddingBatch(msgspec.Struct):
    #: One float32 vector per input, as raw little-endian bytes (cheap to encode either way).
    vectors: list[bytes]
    dimensions: int
    prompt_tokens: int
    #: Milliseconds it waited for its model to be brought onto the device (0: resident).
    cold_start_ms: float = 0.0
    device: str | None = None
    device_cost_per_hour: str | None = None


class EngineState(enum.StrEnum):
    """Where an engine is in its life (see `serving.pool` for the switches between them)."""

    #: Not started, or stopped (to make room, for being idle, at shutdown).
    COLD = "cold"
    #: Starting (first time, on demand, or again after a crash).
    STARTING = "starting"
    READY = "ready"
    #: Weights offloaded to host memory, KV cache dropped (vLLM's sleep mode, GPUs).
    SLEEPING = "sleeping"
    WAKING = "waking"
    STOPPING = "stopping"
    #: Its process died (a restart is scheduled, after a backoff), or its start failed.
    FAILED = "failed"


class EngineStats(msgspec.Struct):
    """What the engine's scheduler last reported, plus high-water marks since start."""

    ready: bool = False
    state: EngineState = EngineState.COLD
    #: Restarts after a crash since the process started.
    restarts: int = 0
    #: Why the engine last failed (the error's class and message).
    last_error: str | None = None
    running: int = 0
    waiting: int = 0
    peak_running: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    requests_finished: int = 0
    #: Milliseconds the engine has spent in steps since it (last) started.
    busy_ms: float = 0.0
    #: Engine milliseconds of the requests that ended, in all (since the process started).
    engine_ms_total: float = 0.0
    #: Requests let in by the admission queue and not done, those waiting in it, and its
    #: bounds.
    admitted: int = 0
    queued: int = 0
    slots: int = 0
    max_queued: int = 0


class ModelEngine(abc.ABC):
    """One model served by one engine."""

    spec: ModelSpec
    #: The device's pool, which brings the model in when a request needs it (none: the
    #: engine is started and stopped by its owner alone).
    pool: ModelPool | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the engine; returns when it can take requests."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop the engine and its processes (it may be started again)."""

    def check_options(self) -> None:  # noqa: B027 (engines without options to check)
        """Check the entry's engine arguments without starting anything.

        Raises:
            CatalogError: they are not valid.
        """

    def load_tokenizer(self) -> None:  # noqa: B027 (engines that need no tokenizer)
        """Load the tokenizer and chat template, and read the model's limits, without the
        engine, so that requests can be checked before anything starts. Blocking."""

    @property
    def supervised(self) -> bool:
        """Started and watched: a crash is restarted by the engine's own supervisor."""
        return False

    @property
    def can_sleep(self) -> bool:
        """Whether `sleep` can take it off the device (vLLM's sleep mode, where enabled)."""
        return False

    async def sleep(self) -> None:
        """Free its device memory but keep the process (weights to host memory)."""
        raise NotImplementedError

    async def wake(self) -> None:
        """Undo `sleep`."""
        raise NotImplementedError

    def memory_bytes(self) -> int | None:
        """What its processes take in host memory (``None`` on devices with their own)."""
        return None

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Current scheduler figures; cheap enough to call per request."""

    @property
    def state(self) -> EngineState:
        return self.stats().state

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int:
        """Context length: prompt plus output tokens."""

    @abc.abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` as the model sees it.

        Generation models get no special tokens (a chat template supplies them); embedding
        models get the ones they were trained with around each input.
        """

    @abc.abstractmethod
    def check_prompt(self, prompt: list[int], max_tokens: int) -> None:
        """Check a prompt and its output budget before any work is queued for it.

        Raises:
            InvalidPrompt: empty, token ids outside the vocabulary, or longer than the context.
        """


class GenerationEngine(ModelEngine):
    """A model that continues prompts."""

    @abc.abstractmethod
    def render_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Apply the model's chat template to ``(role, content)`` pairs and tokenize."""

    @abc.abstractmethod
    def generate(
        self,
        prompt: list[int],
        options: SamplingOptions,
        request_id: str,
        *,
        stream: bool,
        context: RequestContext | None = None,
        adapter: str | None = None,
    ) -> AsyncIterator[GenerationChunk]:
        """Generate from token ids, with one of the model's LoRA adapters if ``adapter``.

        ``context`` places the request in the engine's admission queue (its group, weight
        and class) and its prefix cache (its salt); see `serving.fairqueue`.

        With ``stream`` each chunk carries what is new; without it one chunk carries all.
        Closing the iterator early aborts the request in the engine.

        Nothing reaches the engine until the iterator is first advanced; then, if the engine
        is restarting, the request waits for it a bounded time.

        Raises:
            InvalidPrompt: at once, before anything is iterated, when the prompt or the
                options cannot be served; or from the first ``anext`` when the engine's own
                validation refuses them.
            EngineNotReady: the engine never started, or did not come back in time; or
                (`serving.fairqueue.QueueFull`) too many requests wait for it.
            EngineDead: the engine died while the request ran.
        """


class EmbeddingEngine(ModelEngine):
    """A model that maps texts to vectors."""

    @property
    @abc.abstractmethod
    def dimensions(self) -> int:
        """The length of each vector (0 before the engine first started)."""

    @abc.abstractmethod
    async def embed(self, inputs: Sequence[list[int]], request_id: str) -> EmbeddingBatch:
        """Embed each token sequence; all of them are batched together by the engine."""
