"""One generation request in flight: engine streams in, an OpenAI answer or SSE stream out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.response import Stream

from billing.events import EventStatus, UsageEvent
from gateway.admission import Ticket
from gateway.api._render import (
    DONE,
    ChoiceAccumulator,
    Flavor,
    Usage,
    chat_logprobs,
    finish_reason,
    sse,
    text_logprobs,
    usage_body,
)
from gateway.errors import APIError, InvalidRequest, ServiceUnavailable
from gateway.observe import Observation
from gateway.usage import Receipt, cost_header
from serving import (
    EngineDead,
    EngineNotReady,
    GenerationChunk,
    GenerationEngine,
    InvalidPrompt,
    SamplingOptions,
    ServingError,
)

__all__ = ["Generation", "api_error", "json_response"]

_JSON = "application/json"
_encode = msgspec.json.Encoder().encode


def json_response(body: dict[str, Any], status_code: int = 200) -> Response[bytes]:
    return Response(content=_encode(body), media_type=_JSON, status_code=status_code)


def api_error(exc: ServingError) -> APIError:
    if isinstance(exc, InvalidPrompt):
        code = "context_length_exceeded" if exc.too_long else None
        return InvalidRequest(str(exc), param=exc.param, code=code)
    if isinstance(exc, EngineNotReady):
        return ServiceUnavailable(str(exc), code="model_not_ready")
    if isinstance(exc, EngineDead):
        return ServiceUnavailable(str(exc), code="engine_unavailable")
    return APIError("The server had an error while processing your request.")


class Generation:
    """One generation request in flight: its prompts, its options and its observation."""

    def __init__(
        self,
        *,
        flavor: Flavor,
        engine: GenerationEngine,
        prompts: list[list[int]],
        options: SamplingOptions,
        request_id: str,
        include_usage: bool,
        obs: Observation,
        stream: bool,
        ticket: Ticket,
        receipt: Receipt | None,
    ) -> None:
        self.flavor = flavor
        self.engine = engine
        self.prompts = prompts
        self.options = options
        self.request_id = request_id
        self.include_usage = include_usage
        self.obs = obs
        self.ticket = ticket
        self.receipt = receipt
        self._queued = False
        self._done = False
        self.created = int(time.time())
        prefix = "chatcmpl-" if flavor == "chat" else "cmpl-"
        self.response_id = prefix + request_id.removeprefix("req_")
        self.object = "chat.completion" if flavor == "chat" else "text_completion"
        self.usage = Usage(prompt_tokens=sum(len(p) for p in prompts))
        self.finish_reasons: list[str] = []
        self._event_parts: tuple[bytes, bytes, bytes] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        try:
            self.streams = [
                engine.generate(prompt, options, f"{request_id}-{i}", stream=stream)
                for i, prompt in enumerate(prompts)
            ]
            self._queued = True
        except ServingError as exc:
            self._finish(error=type(exc).__name__)
            raise api_error(exc) from exc

    def _count(self, chunk: GenerationChunk, first: bool) -> None:
        if first:
            self.usage.cached_tokens += chunk.cached_tokens
        for choice in chunk.choices:
            self.usage.completion_tokens += choice.num_tokens
            if choice.finish_reason is not None:
                self.finish_reasons.append(finish_reason(choice) or "stop")

    def _finish(
        self, error: str | None = None, outcome: str = "ok", *, durable: bool = False
    ) -> UsageEvent | None:
        """Close the request once: settle its quota, record its span and metrics, and make
        its usage event; the event is appended in the background unless ``durable`` (then
        the caller appends it before the answer ends)."""
        if self._done:
            return None
        self._done = True
        # Quota settles to what the engine worked on: nothing if it never took the request.
        if self._queued:
            self.ticket.settle(self.usage.prompt_tokens, self.usage.completion_tokens)
        else:
            self.ticket.settle(0, 0)
        self.obs.finish(
            input_tokens=self.usage.prompt_tokens,
            output_tokens=self.usage.completion_tokens,
            cached_tokens=self.usage.cached_tokens,
            finish_reasons=self.finish_reasons,
            error=error,
            outcome=outcome,
        )
        if self.receipt is None:
            return None
        status = (
            EventStatus.ABORTED
            if outcome == "aborted"
            else EventStatus.ERROR
            if error
            else EventStatus.OK
        )
        event = self.receipt.event(
            self.request_id,
            model=self.engine.name,
            status=status,
            prompt_tokens=self.usage.prompt_tokens if self._queued else 0,
            cached_tokens=self.usage.cached_tokens,
            completion_tokens=self.usage.completion_tokens,
            started=self.obs.started,
            first_token_at=self.obs.first_token_at,
        )
        if not durable:
            self.receipt.recorder.record_later(event)
        return event

    async def complete(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        """Run to the end and answer with one JSON body; abort if the client goes away."""
        acc = ChoiceAccumulator()
        n = self.options.n

        async def run(p: int, chunks: AsyncIterator[GenerationChunk]) -> None:
            first = True
            async for chunk in chunks:
                self.obs.first_token()
                self._count(chunk, first)
                first = False
                for choice in chunk.choices:
                    acc.add(p * n + choice.index, choice)

        try:
            with self.obs.engine_span("engine.generate"):
                work = asyncio.gather(*(run(p, s) for p, s in enumerate(self.streams)))
                await _unless_disconnected(work, request)
        except ServingError as exc:
            self._finish(error=type(exc).__name__)
            raise api_error(exc) from exc
        except ClientDisconnected:
            self._finish(outcome="aborted")
            return Response(content=b"", status_code=499)  # nginx's "client closed request"
        except BaseException as exc:
            self._finish(error=type(exc).__name__, outcome="aborted")
            raise
        event = self._finish(durable=True)
        headers = None
        if event is not None and self.receipt is not None:
            await self.receipt.recorder.record(event)  # durable before the answer leaves
            headers = cost_header(event)
        response = json_response(
            {
                "id": self.response_id,
                "object": self.object,
                "created": self.created,
                "model": self.engine.name,
                "choices": acc.choices(self.flavor),
                "usage": usage_body(self.usage),
                "system_fingerprint": None,
            }
        )
        if headers:
            response.headers.update(headers)
        return response

    def _chunk(
        self,
        choices: list[dict[str, Any]],
        usage: Usage | None = None,
        event: UsageEvent | None = None,
    ) -> bytes:
        body: dict[str, Any] = {
            "id": self.response_id,
            "object": self.object + ".chunk" if self.flavor == "chat" else self.object,
            "created": self.created,
            "model": self.engine.name,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage_body(usage) if usage is not None else None
            if event is not None:  # the receipt of a streamed answer
                body["usage"]["cost_usd"] = f"{event.cost_usd:f}"
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

    def _source(self) -> AsyncIterator[tuple[int, GenerationChunk]]:
        """Every prompt's chunks as one sequence of ``(prompt index, chunk)``."""
        if len(self.streams) == 1:
            return _tag(self.streams[0])
        queue: asyncio.Queue[tuple[int, GenerationChunk] | BaseException | None] = asyncio.Queue()

        async def pump(p: int, chunks: AsyncIterator[GenerationChunk]) -> None:
            try:
                async for chunk in chunks:
                    queue.put_nowait((p, chunk))
            except BaseException as exc:
                queue.put_nowait(exc)
                raise
            finally:
                queue.put_nowait(None)

        self._tasks = [asyncio.create_task(pump(p, s)) for p, s in enumerate(self.streams)]
        return _drain(queue, len(self._tasks))

    async def _close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for s in self.streams:
            await s.aclose()  # type: ignore[attr-defined]

    async def open_stream(self) -> Stream:
        """Wait for the first output, then answer with the SSE stream.

        Headers leave with the first token, so an error before it still gets its own status
        code rather than a 200 with an error event inside.
        """
        source = self._source()
        try:
            first: tuple[int, GenerationChunk] | None = await anext(source)
            self.obs.first_token()
        except StopAsyncIteration:
            first = None
        except ServingError as exc:
            await self._close()
            self._finish(error=type(exc).__name__)
            raise api_error(exc) from exc
        except BaseException as exc:
            await self._close()
            self._finish(error=type(exc).__name__, outcome="aborted")
            raise
        return Stream(
            self._events(source, first),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    def _chunk_events(self, p: int, chunk: GenerationChunk, seen: set[int]) -> list[bytes]:
        """Count one engine chunk of prompt ``p`` and render it, one choice per event."""
        self._count(chunk, p not in seen)
        seen.add(p)
        n = self.options.n
        events = []
        for c in chunk.choices:
            if c.finish_reason is None and c.logprobs is None:
                if c.text:
                    events.append(self._delta_event(p * n + c.index, c.text))
            else:
                events.append(self._chunk([self._choice_event(p * n + c.index, c)]))
        return events

    async def _events(
        self,
        source: AsyncIterator[tuple[int, GenerationChunk]],
        first: tuple[int, GenerationChunk] | None,
    ) -> AsyncIterator[bytes]:
        """The SSE events; closing this early aborts every prompt in the engine."""
        n = self.options.n
        error: str | None = None
        outcome = "ok"
        seen: set[int] = set()
        try:
            if self.flavor == "chat":
                role = [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for i in range(n * len(self.prompts))
                ]
                yield self._chunk(role)
            if first is not None:
                for event in self._chunk_events(*first, seen):
                    yield event
            async for p, chunk in source:
                for event in self._chunk_events(p, chunk, seen):
                    yield event
            receipt = self._finish(durable=True)
            if receipt is not None and self.receipt is not None:
                await self.receipt.recorder.record(receipt)  # durable before the answer ends
            if self.include_usage:
                yield self._chunk([], self.usage, receipt)
            yield DONE
        except ServingError as exc:
            error = type(exc).__name__
            yield sse(api_error(exc).body())
            yield DONE
        except BaseException as exc:  # the client went away (cancelled) or the loop is closing
            error, outcome = type(exc).__name__, "aborted"
            raise
        finally:
            await self._close()
            self._finish(error=error, outcome=outcome)


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready."""


async def _unless_disconnected(work: asyncio.Future[Any], request: Request[Any, Any, Any]) -> None:
    """Await ``work``; cancel it (aborting it in the engine) if the client disconnects first."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work.done():
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise ClientDisconnected
    work.result()


async def _tag(
    chunks: AsyncIterator[GenerationChunk],
) -> AsyncIterator[tuple[int, GenerationChunk]]:
    async for chunk in chunks:
        yield 0, chunk


async def _drain(
    queue: asyncio.Queue[tuple[int, GenerationChunk] | BaseException | None], producers: int
) -> AsyncIterator[tuple[int, GenerationChunk]]:
    done = 0
    while done < producers:
        item = await queue.get()
        if item is None:
            done += 1
        elif isinstance(item, BaseException):
            raise item
        else:
            yield item
