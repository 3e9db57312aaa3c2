"""One generation call's answer: engine streams in, an OpenAI answer or an SSE stream out.

Runs as the body of a `CallResponse` (see `gateway.api._serve`). Every prompt of the call is
one engine request; they run as tasks of one task group, each owning (and, on any early end,
closing, which aborts it in the engine) its own engine stream, so that a client who leaves,
an engine that fails or a prompt that errs ends all of them together.

A deterministic call with a cache key goes through the response cache first (see
`gateway.cache.responses`): a hit replays a recording, a call whose key is being generated
follows that generation, and a miss starts the generation that later callers follow. The
answer is rendered the same way from whichever source.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, cast

import msgspec
from litestar.types import Send

from gateway.api._render import (
    DONE,
    ChoiceAccumulator,
    Flavor,
    chat_logprobs,
    finish_reason,
    sse,
    text_logprobs,
    usage_body,
)
from gateway.api._serve import api_error, json_response, outcome_of, send_error, send_json
from gateway.cache.responses import (
    CacheMode,
    CacheStatus,
    Recording,
    ResponseCache,
    run_streams,
)
from gateway.calls import Call, Outcome
from gateway.usage import cost_header
from serving import (
    GenerationChunk,
    GenerationEngine,
    RequestContext,
    SamplingOptions,
    ServingError,
)

__all__ = ["Generation", "json_response"]

_encode = msgspec.json.Encoder().encode
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]

#: An answer that did not run on the engine.
_FROM_CACHE = (CacheStatus.HIT, CacheStatus.SHARED)

#: Called with (prompt index, chunk) for every engine chunk, in order of arrival.
OnChunk = Callable[[int, GenerationChunk], Awaitable[None]]


class Generation:
    """The answer of one chat or completion call.

    Args:
        flavor: ``chat`` or ``text``.
        engine: The model's engine.
        prompts: The prompts' token ids (one engine request each).
        options: Sampling options, shared by every prompt.
        call: The call this answer ends.
        stream: Answer as server-sent events.
        include_usage: Streams end with a usage chunk (``stream_options.include_usage``).
        cache: The response cache, for a deterministic call; ``None`` bypasses it.
        cache_key: The call's key in ``cache``.
        cache_mode: What the client allows of the cache.
        context: The engine request context (fairness group, class, prefix-cache salt).
        recording: The call's answer, found in the response cache already (a hit).
    """

    def __init__(
        self,
        *,
        flavor: Flavor,
        engine: GenerationEngine,
        prompts: list[list[int]],
        options: SamplingOptions,
        call: Call,
        stream: bool,
        include_usage: bool,
        cache: ResponseCache | None = None,
        cache_key: str | None = None,
        cache_mode: CacheMode = CacheMode.USE,
        context: RequestContext | None = None,
        recording: Recording | None = None,
        adapter: str | None = None,
    ) -> None:
        self.flavor = flavor
        self.engine = engine
        self.prompts = prompts
        self.options = options
        self.call = call
        self.stream = stream
        self.include_usage = include_usage
        self.created = int(time.time())
        prefix = "chatcmpl-" if flavor == "chat" else "cmpl-"
        self.response_id = prefix + call.request_id.removeprefix("req_")
        self.object = "chat.completion" if flavor == "chat" else "text_completion"
        self._seen: set[int] = set()
        #: Engine milliseconds of each prompt's request so far.
        self._engine_ms: dict[int, float] = {}
        #: The longest any prompt waited in the engine's admission queue.
        self.queue_ms = 0.0
        #: The longest any prompt waited for its model to be brought onto the device.
        self.cold_start_ms = 0.0
        self.cache = cache if cache_key is not None and cache_mode is not CacheMode.OFF else None
        self.cache_key = cache_key
        self.cache_mode = cache_mode
        self._event_parts: tuple[bytes, bytes, bytes] | None = None
        self.recording = recording
        # Made now, so that a request the engine cannot take fails in the route; nothing
        # reaches the engine until a stream is first advanced.
        self._streams = (
            []
            if recording is not None
            else [
                cast(
                    AsyncGenerator[GenerationChunk, None],
                    engine.generate(
                        prompt,
                        options,
                        f"{call.request_id}-{i}",
                        stream=True,
                        context=context,
                        adapter=adapter,
                    ),
                )
                for i, prompt in enumerate(prompts)
            ]
        )

    async def __call__(self, send: Send) -> None:
        with self.call.obs.engine_span("engine.generate"):
            if self.stream:
                await self._answer_stream(send)
            else:
                await self._answer(send)

    # The engine side

    def _count(self, p: int, chunk: GenerationChunk) -> None:
        usage = self.call.usage
        if p not in self._seen:  # the engine has worked on this prompt
            self._seen.add(p)
            usage.prompt_tokens += len(self.prompts[p])
            # An answer from the cache (or another call's generation) had its whole prompt
            # served from cache.
            from_cache = self.call.cache_status in _FROM_CACHE
            usage.cached_tokens += len(self.prompts[p]) if from_cache else chunk.cached_tokens
            self.call.obs.first_token()
        if self.call.cache_status not in _FROM_CACHE:
            if chunk.engine_ms is not None:
                self._engine_ms[p] = chunk.engine_ms
                usage.gpu_ms = sum(self._engine_ms.values())
                usage.device = chunk.device
                usage.device_hour_usd = chunk.device_cost_per_hour
            self.queue_ms = max(self.queue_ms, chunk.queue_ms)
            self.cold_start_ms = max(self.cold_start_ms, chunk.cold_start_ms)
        for choice in chunk.choices:
            usage.completion_tokens += choice.num_tokens
            if choice.finish_reason is not None:
                self.call.finish_reasons.append(finish_reason(choice) or "stop")

    def _headers(self) -> dict[str, str]:
        headers = {"x-tollgate-queue-ms": f"{self.queue_ms:.1f}"}
        if self.cold_start_ms:
            headers["x-tollgate-cold-start-ms"] = f"{self.cold_start_ms:.0f}"
        status = self.call.cache_status
        if status is not None:
            headers["x-tollgate-cache"] = status.value
        return headers

    async def _pump(self, on_chunk: OnChunk) -> None:
        """Hand every chunk of the answer to ``on_chunk``: from the engine, or the cache.

        Raises:
            ServingError: the first serving error of any prompt (the others are aborted).
        """
        cache, key = self.cache, self.cache_key
        if cache is None or key is None:
            if self.cache_key is not None:  # deterministic, but the client said no-store
                self.call.cache_status = CacheStatus.BYPASS
            await run_streams(self._streams, on_chunk)
            return
        flight = None
        if self.cache_mode is CacheMode.USE:
            recording = self.recording  # looked up by the route, before admission
            if recording is not None:
                self._settle_source(cache, CacheStatus.HIT)
                for p, chunk in recording.items:
                    await on_chunk(p, chunk)
                return
            flight = cache.join(key)
        if flight is None and self.cache_mode is CacheMode.USE:
            # Another replica may be generating it: its answer, once it is done.
            recording = await cache.elsewhere(key)
            flight = cache.join(key)  # or a flight here started meanwhile
            if flight is None and recording is not None:
                self._settle_source(cache, CacheStatus.SHARED)
                for p, chunk in recording.items:
                    await on_chunk(p, chunk)
                return
        if flight is not None:
            self._settle_source(cache, CacheStatus.SHARED)
        else:
            self._settle_source(cache, CacheStatus.MISS)
            flight = cache.start(key, self._streams, store=True)
        self.call.obs.set(**{"tollgate.cache": self.call.cache_status})
        async with contextlib.aclosing(flight.follow()) as items:
            async for p, chunk in items:
                await on_chunk(p, chunk)

    def _settle_source(self, cache: ResponseCache, status: CacheStatus) -> None:
        self.call.cache_status = status
        cache.count(self.engine.name, status)
        if status is not CacheStatus.MISS:
            self._streams = []  # never started: nothing reached the engine

    # Non-streamed

    async def _answer(self, send: Send) -> None:
        acc = ChoiceAccumulator()
        n = self.options.n

        async def collect(p: int, chunk: GenerationChunk) -> None:
            self._count(p, chunk)
            for choice in chunk.choices:
                acc.add(p * n + choice.index, choice)

        try:
            await self._pump(collect)
        except ServingError as exc:
            self.call.close(outcome_of(exc), type(exc).__name__)
            await send_error(send, api_error(exc))
            return
        event = await self.call.commit()
        body = {
            "id": self.response_id,
            "object": self.object,
            "created": self.created,
            "model": self.call.model,
            "choices": acc.choices(self.flavor),
            "usage": usage_body(self.call.usage),
            "system_fingerprint": None,
        }
        headers = self._headers()
        headers["x-tollgate-gpu-ms"] = f"{self.call.usage.gpu_ms:.3f}"
        if event:
            headers.update(cost_header(event))
        await send_json(send, 200, _encode(body), headers)

    # Streamed

    async def _answer_stream(self, send: Send) -> None:
        started = False
        call = self.call

        async def start() -> None:
            nonlocal started
            started = True
            headers = _SSE_HEADERS + [(k.encode(), v.encode()) for k, v in self._headers().items()]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            call.delivered = True

        async def forward(p: int, chunk: GenerationChunk) -> None:
            self._count(p, chunk)
            events = [] if started else self._opening()
            if not started:
                await start()
            events.extend(self._chunk_events(p, chunk))
            if events:
                await send(
                    {"type": "http.response.body", "body": b"".join(events), "more_body": True}
                )

        try:
            await self._pump(forward)
        except ServingError as exc:
            if not started:
                call.close(outcome_of(exc), type(exc).__name__)
                await send_error(send, api_error(exc))
                return
            call.close(Outcome.ERROR, type(exc).__name__)
            tail = sse(api_error(exc).body()) + DONE
            await send({"type": "http.response.body", "body": tail, "more_body": False})
            return
        opening = b"" if started else b"".join(self._opening())
        if not started:
            await start()
        event = await call.commit()
        tail = (
            self._chunk([], usage=True, cost=event.cost_usd if event else None)
            if self.include_usage
            else b""
        )
        await send(
            {"type": "http.response.body", "body": opening + tail + DONE, "more_body": False}
        )

    def _opening(self) -> list[bytes]:
        """The first event of a chat stream: every choice's role."""
        if self.flavor != "chat":
            return []
        role = [
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for i in range(self.options.n * len(self.prompts))
        ]
        return [self._chunk(role)]

    def _chunk(
        self, choices: list[dict[str, Any]], *, usage: bool = False, cost: Any = None
    ) -> bytes:
        body: dict[str, Any] = {
            "id": self.response_id,
            "object": self.object + ".chunk" if self.flavor == "chat" else self.object,
            "created": self.created,
            "model": self.call.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage_body(self.call.usage) if usage else None
            if usage and cost is not None:  # the receipt of a streamed answer
                body["usage"]["cost_usd"] = f"{cost:f}"
        return sse(body)

    def _delta_event(self, index: int, text: str) -> bytes:
        """The common event, a text delta, spliced from pre-encoded parts (the hot path)."""
        if self._event_parts is None:
            probe = self._chunk([{"index": 0, "__slot__": None}])
            head, _, tail = probe.partition(b'0,"__slot__":null')
            field = b'"delta":{"content":' if self.flavor == "chat" else b'"text":'
            close = b"}" if self.flavor == "chat" else b""
            self._event_parts = (
                head,
                b"," + field,
                close + b',"logprobs":null,"finish_reason":null' + tail,
            )
        head, middle, tail = self._event_parts
        return head + str(index).encode() + middle + _encode(text) + tail

    def _choice_event(self, index: int, delta: Any) -> dict[str, Any]:
        reason = finish_reason(delta)
        if self.flavor == "chat":
            content = {"content": delta.text} if delta.text else {}
            return {
                "index": index,
                "delta": content,
                "logprobs": chat_logprobs(delta.logprobs),
                "finish_reason": reason,
            }
        return {
            "index": index,
            "text": delta.text,
            "logprobs": text_logprobs(delta.logprobs),
            "finish_reason": reason,
        }

    def _chunk_events(self, p: int, chunk: GenerationChunk) -> list[bytes]:
        """One engine chunk of prompt ``p``, one event per choice."""
        n = self.options.n
        events = []
        for c in chunk.choices:
            if c.finish_reason is None and c.logprobs is None:
                if c.text:
                    events.append(self._delta_event(p * n + c.index, c.text))
            else:
                events.append(self._chunk([self._choice_event(p * n + c.index, c)]))
        return events
