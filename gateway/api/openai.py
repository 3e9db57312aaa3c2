"""The OpenAI-compatible routes: chat, completions, embeddings and models."""

from __future__ import annotations

import array
import asyncio
import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.response import Stream

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
from gateway.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    TextOrTokens,
    decode,
)
from gateway.errors import APIError, InvalidRequest, ModelNotFound, ServiceUnavailable
from gateway.middleware import request_id_of
from gateway.observe import Observation
from gateway.settings import Settings
from gateway.telemetry import Telemetry
from serving import (
    EngineDead,
    EngineHost,
    EngineNotReady,
    GenerationChunk,
    GenerationEngine,
    InvalidPrompt,
    SamplingOptions,
    ServingError,
)

__all__ = ["OpenAIController"]

_JSON = "application/json"
_encode = msgspec.json.Encoder().encode


def _json(body: dict[str, Any]) -> Response[bytes]:
    return Response(content=_encode(body), media_type=_JSON)


def _api_error(exc: ServingError) -> APIError:
    if isinstance(exc, InvalidPrompt):
        code = "context_length_exceeded" if "context length" in str(exc) else None
        return InvalidRequest(str(exc), param=exc.param, code=code)
    if isinstance(exc, EngineNotReady):
        return ServiceUnavailable(str(exc), code="model_not_ready")
    if isinstance(exc, EngineDead):
        return ServiceUnavailable(str(exc), code="engine_unavailable")
    return APIError("The server had an error while processing your request.")


def _generation_engine(host: EngineHost, model: str) -> GenerationEngine:
    engine = host.get(model)
    if engine is None:
        raise ModelNotFound(model)
    if not isinstance(engine, GenerationEngine):
        raise InvalidRequest(
            f"The model `{model}` is an embedding model; use /v1/embeddings.",
            param="model",
            code="model_not_supported",
        )
    return engine


def _check_n(n: int, settings: Settings) -> None:
    if n > settings.max_n:
        raise InvalidRequest(f"n must be at most {settings.max_n}.", param="n")


class _Generation:
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
    ) -> None:
        self.flavor = flavor
        self.engine = engine
        self.prompts = prompts
        self.options = options
        self.request_id = request_id
        self.include_usage = include_usage
        self.obs = obs
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
        except ServingError as exc:
            self._finish(error=type(exc).__name__)
            raise _api_error(exc) from exc

    def _count(self, chunk: GenerationChunk, first: bool) -> None:
        if first:
            self.usage.cached_tokens += chunk.cached_tokens
        for choice in chunk.choices:
            self.usage.completion_tokens += choice.num_tokens
            if choice.finish_reason is not None:
                self.finish_reasons.append(finish_reason(choice) or "stop")

    def _finish(self, error: str | None = None, outcome: str = "ok") -> None:
        self.obs.finish(
            input_tokens=self.usage.prompt_tokens,
            output_tokens=self.usage.completion_tokens,
            cached_tokens=self.usage.cached_tokens,
            finish_reasons=self.finish_reasons,
            error=error,
            outcome=outcome,
        )

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
            raise _api_error(exc) from exc
        except ClientDisconnected:
            self._finish(outcome="aborted")
            return Response(content=b"", status_code=499)  # nginx's "client closed request"
        except BaseException as exc:
            self._finish(error=type(exc).__name__, outcome="aborted")
            raise
        self._finish()
        return _json(
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

    def _chunk(self, choices: list[dict[str, Any]], usage: Usage | None = None) -> bytes:
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
            raise _api_error(exc) from exc
        except BaseException as exc:
            await self._close()
            self._finish(error=type(exc).__name__, outcome="aborted")
            raise
        return Stream(
            self._events(source, first),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

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
            pending = [first] if first is not None else []
            async for p, chunk in _chain(pending, source):
                self.obs.first_token()
                self._count(chunk, p not in seen)
                seen.add(p)
                for c in chunk.choices:  # one choice per event, as OpenAI streams them
                    if c.finish_reason is None and c.logprobs is None:
                        if c.text:
                            yield self._delta_event(p * n + c.index, c.text)
                    else:
                        yield self._chunk([self._choice_event(p * n + c.index, c)])
            if self.include_usage:
                yield self._chunk([], self.usage)
            yield DONE
        except ServingError as exc:
            error = type(exc).__name__
            yield sse(_api_error(exc).body())
            yield DONE
        except BaseException as exc:  # the client went away (cancelled) or the loop is closing
            error, outcome = type(exc).__name__, "aborted"
            raise
        finally:
            await self._close()
            self._finish(error=error, outcome=outcome)


async def _chain(
    head: list[tuple[int, GenerationChunk]], rest: AsyncIterator[tuple[int, GenerationChunk]]
) -> AsyncIterator[tuple[int, GenerationChunk]]:
    for item in head:
        yield item
    async for item in rest:
        yield item


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


def _split_inputs(raw: TextOrTokens, param: str) -> list[str | list[int]]:
    """One string, a token array, strings, or token arrays, as a list of single inputs."""
    if isinstance(raw, str):
        return [raw]
    if not raw:
        raise InvalidRequest(f"{param} must not be empty.", param=param)
    if all(isinstance(x, int) for x in raw):
        return [[x for x in raw if isinstance(x, int)]]
    if all(isinstance(x, str) for x in raw):
        return [x for x in raw if isinstance(x, str)]
    if all(isinstance(x, list) for x in raw):
        return [x for x in raw if isinstance(x, list)]
    raise InvalidRequest(
        f"{param} must be a string, an array of strings, a token array or an array of "
        "token arrays, not a mixture.",
        param=param,
    )


class OpenAIController(Controller):
    path = "/v1"

    @post("/chat/completions", status_code=200)
    async def chat_completions(
        self,
        request: Request[Any, Any, Any],
        host: EngineHost,
        settings: Settings,
        telemetry: Telemetry,
    ) -> Response[Any]:
        req = decode(await request.body(), ChatCompletionRequest)
        engine = _generation_engine(host, req.model)
        _check_n(req.n, settings)
        if len(req.messages) > settings.max_messages:
            raise InvalidRequest(
                f"messages may hold at most {settings.max_messages} items.", param="messages"
            )
        try:
            conversation = [(m.role, m.text()) for m in req.messages]
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="messages") from exc
        try:
            prompt = engine.render_chat(conversation)
        except ServingError as exc:
            raise _api_error(exc) from exc
        max_tokens = req.max_completion_tokens or req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs to be true.", param="top_logprobs")
        return await self._start(
            "chat", request, engine, [prompt], req, max_tokens, logprobs, telemetry
        )

    @post("/completions", status_code=200)
    async def completions(
        self,
        request: Request[Any, Any, Any],
        host: EngineHost,
        settings: Settings,
        telemetry: Telemetry,
    ) -> Response[Any]:
        req = decode(await request.body(), CompletionRequest)
        engine = _generation_engine(host, req.model)
        _check_n(req.n, settings)
        if req.echo:
            raise InvalidRequest("echo is not supported.", param="echo")
        if req.suffix:
            raise InvalidRequest("suffix is not supported by this model.", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise InvalidRequest("best_of other than n is not supported.", param="best_of")
        raw = _split_inputs(req.prompt, "prompt")
        if len(raw) * req.n > settings.max_n:
            raise InvalidRequest(
                f"prompts times n must be at most {settings.max_n}.", param="prompt"
            )
        try:
            prompts = [engine.tokenize(p) if isinstance(p, str) else p for p in raw]
        except ServingError as exc:
            raise _api_error(exc) from exc
        return await self._start(
            "text", request, engine, prompts, req, req.max_tokens, req.logprobs, telemetry
        )

    async def _start(
        self,
        flavor: Flavor,
        request: Request[Any, Any, Any],
        engine: GenerationEngine,
        prompts: list[list[int]],
        req: ChatCompletionRequest | CompletionRequest,
        max_tokens: int | None,
        logprobs: int | None,
        telemetry: Telemetry,
    ) -> Response[Any]:
        longest = max(len(p) for p in prompts)
        if max_tokens is None:
            max_tokens = max(engine.max_model_len - longest, 1)
        options = SamplingOptions(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            n=req.n,
            stop=req.stop_list(),
            seed=req.seed,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            logprobs=logprobs,
            ignore_eos=req.ignore_eos,
        )
        request_id = request_id_of(request.scope)
        obs = Observation(
            telemetry,
            "chat" if flavor == "chat" else "text_completion",
            engine.name,
            request_id,
            **{
                "gen_ai.request.max_tokens": max_tokens,
                "gen_ai.request.temperature": req.temperature,
                "gen_ai.request.top_p": req.top_p,
                "gen_ai.request.seed": req.seed,
                "gen_ai.request.choice.count": req.n,
            },
        )
        gen = _Generation(
            flavor=flavor,
            engine=engine,
            prompts=prompts,
            options=options,
            request_id=request_id,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            obs=obs,
            stream=req.stream,
        )
        if req.stream:
            return await gen.open_stream()
        return await gen.complete(request)

    @post("/embeddings", status_code=200)
    async def embeddings(
        self,
        request: Request[Any, Any, Any],
        host: EngineHost,
        settings: Settings,
        telemetry: Telemetry,
    ) -> Response[bytes]:
        req = decode(await request.body(), EmbeddingRequest)
        engine = host.get(req.model)
        if engine is None:
            raise ModelNotFound(req.model)
        from serving import EmbeddingEngine

        if not isinstance(engine, EmbeddingEngine):
            raise InvalidRequest(
                f"The model `{req.model}` does not produce embeddings.",
                param="model",
                code="model_not_supported",
            )
        inputs = _embedding_inputs(req.input, settings.max_embedding_inputs)
        request_id = request_id_of(request.scope)
        obs = Observation(telemetry, "embeddings", engine.name, request_id)
        try:
            token_lists = [engine.tokenize(i) if isinstance(i, str) else i for i in inputs]
            with obs.engine_span("engine.embed"):
                batch = await engine.embed(token_lists, request_id)
        except ServingError as exc:
            obs.finish(error=type(exc).__name__)
            raise _api_error(exc) from exc
        except BaseException as exc:
            obs.finish(error=type(exc).__name__, outcome="aborted")
            raise
        if req.dimensions is not None and req.dimensions != batch.dimensions:
            obs.finish(error="InvalidRequest")
            raise InvalidRequest(
                f"This model produces {batch.dimensions} dimensions; "
                "it cannot shorten its embeddings.",
                param="dimensions",
            )
        obs.finish(input_tokens=batch.prompt_tokens)
        data = []
        for i, raw in enumerate(batch.vectors):
            vector: Any
            if req.encoding_format == "base64":
                vector = base64.b64encode(raw).decode()
            else:
                vector = array.array("f", raw).tolist()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        return _json(
            {
                "object": "list",
                "data": data,
                "model": engine.name,
                "usage": {
                    "prompt_tokens": batch.prompt_tokens,
                    "total_tokens": batch.prompt_tokens,
                },
            }
        )

    @get("/models")
    async def list_models(self, host: EngineHost) -> Response[bytes]:
        return _json({"object": "list", "data": [_model_card(s.name) for s in host.catalog]})

    @get("/models/{model_id:path}")
    async def get_model(self, model_id: str, host: EngineHost) -> Response[bytes]:
        spec = host.catalog.get(model_id.lstrip("/"))
        if spec is None:
            raise ModelNotFound(model_id.lstrip("/"))
        return _json(_model_card(spec.name))


_CREATED = int(time.time())


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": _CREATED, "owned_by": "tollgate"}


def _embedding_inputs(raw: TextOrTokens, limit: int) -> list[str | list[int]]:
    items = _split_inputs(raw, "input")
    if len(items) > limit:
        raise InvalidRequest(f"input may hold at most {limit} items.", param="input")
    if any(not item for item in items):
        raise InvalidRequest("input must not contain empty strings or arrays.", param="input")
    return items
