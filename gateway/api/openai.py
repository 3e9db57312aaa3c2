"""The OpenAI-compatible routes: chat, completions, embeddings and models.

A model route validates its request, makes its `Call` (the one owner of its settlement, its
usage event and its span), admits it against the caller's quotas, and returns a
`CallResponse`: the engine work runs when that answer is sent (see `gateway.api._serve`).
Anything refused up to there never reaches the engine and reserves nothing.
"""

from __future__ import annotations

import array
import base64
import hashlib
import time
from typing import Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.types import Send

from gateway.api import openapi as docs
from gateway.api._generation import Generation
from gateway.api._render import Flavor
from gateway.api._serve import CallResponse, api_error, outcome_of, send_error, send_json
from gateway.api._shapes import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    CreateEmbeddingResponse,
    Model,
    ModelList,
)
from gateway.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    JsonObjectFormat,
    JsonSchemaFormat,
    TextOrTokens,
    decode,
)
from gateway.auth import principal_of
from gateway.cache.responses import CacheMode, deterministic
from gateway.calls import Call
from gateway.errors import InvalidRequest, ModelNotFound, PermissionDenied
from gateway.middleware import add_response_headers, request_id_of
from gateway.services import Services
from gateway.settings import Settings
from gateway.usage import cost_header
from serving import (
    EmbeddingEngine,
    EngineHost,
    GenerationEngine,
    ModelEngine,
    ModelSpec,
    ResponseFormat,
    SamplingOptions,
    ServingError,
)

__all__ = ["OpenAIController"]

_encode = msgspec.json.Encoder().encode


def _json(body: dict[str, Any]) -> Response[bytes]:
    return Response(content=_encode(body), media_type="application/json")


def _open_call(
    request: Request[Any, Any, Any],
    services: Services,
    operation: str,
    engine: ModelEngine,
    adapter: str | None = None,
) -> Call:
    """Make the request's call, once its model is known; refuse callers who may not use it.

    A call to an adapter is the adapter's (``model:adapter``): billed and priced under that
    name (the price book falls back to the model's price).
    """
    principal = principal_of(request.scope)
    state = request.scope.setdefault("state", {})
    model = f"{engine.name}:{adapter}" if adapter is not None else engine.name
    call = Call(
        request_id=request_id_of(request.scope),
        operation=operation,
        model=model,
        telemetry=services.telemetry,
        recorder=services.usage,
        principal=principal,
    )
    state["call"] = call
    if principal is not None and principal.operator:
        # Work must land on a tenant's bill: the operator's token is for /admin/v1 only.
        raise PermissionDenied(
            "The admin token cannot call models; use an API key of a tenant.",
            code="admin_token_not_allowed",
        )
    if principal is not None and not (principal.may_use(engine.name) or principal.may_use(model)):
        raise PermissionDenied(
            f"This API key may not use the model `{model}`.",
            param="model",
            code="model_not_allowed",
        )
    return call


async def _admit(
    request: Request[Any, Any, Any],
    services: Services,
    call: Call,
    prompt_tokens: int,
    max_output_tokens: int,
) -> None:
    """Reserve quota for the call; its ``x-ratelimit-*`` headers go on any answer."""
    ticket = await services.admission.admit(
        principal_of(request.scope),
        call.request_id,
        call.model,
        prompt_tokens,
        max_output_tokens,
    )
    add_response_headers(request.scope, ticket.headers)
    call.admitted(ticket)


def _engine(host: EngineHost, model: str) -> tuple[ModelEngine, str | None]:
    """The engine serving ``model``, and the adapter it names (``model:adapter``)."""
    found = host.resolve(model)
    if found is None:
        raise ModelNotFound(model)
    return found


def _generation_engine(engine: ModelEngine, model: str) -> GenerationEngine:
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


def _refuse_unsupported(req: ChatCompletionRequest | CompletionRequest) -> None:
    refused = req.refused()
    if refused is not None:
        field, why = refused
        raise InvalidRequest(f"`{field}` is not supported: {why}.", param=field)


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float] | None:
    if not raw:
        return None
    bias: dict[int, float] = {}
    for token, value in raw.items():
        try:
            token_id = int(token)
        except ValueError:
            token_id = -1
        if token_id < 0 or str(token_id) != token.strip():
            raise InvalidRequest(
                f"logit_bias keys must be token ids, got {token[:32]!r}.", param="logit_bias"
            )
        bias[token_id] = value
    return bias


def _response_format(req: ChatCompletionRequest) -> ResponseFormat | None:
    form = req.response_format
    if isinstance(form, JsonObjectFormat):
        return ResponseFormat(kind="json_object")
    if isinstance(form, JsonSchemaFormat):
        schema = form.json_schema.schema or {}
        return ResponseFormat(kind="json_schema", schema=_encode(schema).decode())
    return None


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


#: What a model call can answer besides its result.
_MODEL_ERRORS = (400, 403, 404, 413, 429, 503)


class OpenAIController(Controller):
    path = "/v1"

    @post(
        "/chat/completions",
        status_code=200,
        operation_class=docs.operation(
            "createChatCompletion",
            "Create a model response for a chat conversation",
            tag="OpenAI",
            body=ChatCompletionRequest,
            answers={
                200: docs.json_or_stream(
                    ChatCompletion, ChatCompletionChunk, "The completion, or its stream."
                )
            },
            errors=_MODEL_ERRORS,
            metered=True,
            examples={
                "chat": {
                    "model": "demo-chat",
                    "messages": [{"role": "user", "content": "Hello"}],
                    "max_tokens": 16,
                },
                "stream": {
                    "model": "demo-chat",
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
                    ],
                    "n": 2,
                    "logprobs": True,
                    "top_logprobs": 2,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            },
        ),
    )
    async def chat_completions(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
    ) -> Response[Any]:
        # One dependency: litestar resolves several in a task group, a cost on every call.
        host, settings = services.host, services.settings
        req = decode(await request.body(), ChatCompletionRequest)
        engine, adapter = _engine(host, req.model)
        call = _open_call(request, services, "chat", engine, adapter)
        gen_engine = _generation_engine(engine, req.model)
        _refuse_unsupported(req)
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
            prompt = gen_engine.render_chat(conversation)
        except ServingError as exc:
            raise api_error(exc) from exc
        max_tokens = req.max_completion_tokens or req.max_tokens
        if req.top_logprobs and not req.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs to be true.", param="top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return await self._start(
            "chat",
            request,
            call,
            gen_engine,
            [prompt],
            req,
            max_tokens,
            logprobs,
            services,
            response_format=_response_format(req),
            adapter=adapter,
        )

    @post(
        "/completions",
        status_code=200,
        operation_class=docs.operation(
            "createCompletion",
            "Create a completion of a prompt",
            tag="OpenAI",
            body=CompletionRequest,
            answers={
                200: docs.json_or_stream(
                    Completion, CompletionChunk, "The completion, or its stream."
                )
            },
            errors=_MODEL_ERRORS,
            metered=True,
            examples={
                "text": {"model": "demo-chat", "prompt": "Once upon a time", "logprobs": 2},
                "stream": {
                    "model": "demo-chat",
                    "prompt": ["Once upon a time", "In a land"],
                    "max_tokens": 8,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            },
        ),
    )
    async def completions(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
    ) -> Response[Any]:
        # One dependency: litestar resolves several in a task group, a cost on every call.
        host, settings = services.host, services.settings
        req = decode(await request.body(), CompletionRequest)
        engine, adapter = _engine(host, req.model)
        call = _open_call(request, services, "text_completion", engine, adapter)
        gen_engine = _generation_engine(engine, req.model)
        _refuse_unsupported(req)
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
            prompts = [gen_engine.tokenize(p) if isinstance(p, str) else p for p in raw]
        except ServingError as exc:
            raise api_error(exc) from exc
        return await self._start(
            "text",
            request,
            call,
            gen_engine,
            prompts,
            req,
            req.max_tokens,
            req.logprobs,
            services,
            adapter=adapter,
        )

    async def _start(
        self,
        flavor: Flavor,
        request: Request[Any, Any, Any],
        call: Call,
        engine: GenerationEngine,
        prompts: list[list[int]],
        req: ChatCompletionRequest | CompletionRequest,
        max_tokens: int | None,
        logprobs: int | None,
        services: Services,
        *,
        response_format: ResponseFormat | None = None,
        adapter: str | None = None,
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
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logprobs=logprobs,
            ignore_eos=req.ignore_eos,
            logit_bias=_logit_bias(req.logit_bias),
            response_format=response_format,
            top_k=req.top_k,
            min_p=req.min_p,
            repetition_penalty=req.repetition_penalty,
        )
        cache, key, mode = services.cache, None, CacheMode.of(request.headers.get("cache-control"))
        principal = principal_of(request.scope)
        context = services.policy.context(principal)
        if cache.enabled and deterministic(options):
            key = cache.key(
                tenant=principal.tenant_id or "" if principal is not None else "",
                model=call.model,
                model_digest=_digest(engine.spec),
                prompts=prompts,
                options=options,
            )
        # A hit found now needs no engine request made (nor its sampling checked again: an
        # identical request was answered).
        recording = await cache.lookup(key) if key is not None and mode is CacheMode.USE else None
        try:  # before admission: a bad request reserves nothing
            answer = Generation(
                flavor=flavor,
                engine=engine,
                prompts=prompts,
                options=options,
                call=call,
                stream=bool(req.stream),
                include_usage=bool(req.stream_options and req.stream_options.include_usage),
                cache=cache,
                cache_key=key,
                cache_mode=mode,
                context=context,
                recording=recording,
                adapter=adapter,
            )
        except ServingError as exc:
            raise api_error(exc) from exc
        call.obs.set(
            **{
                "gen_ai.request.max_tokens": max_tokens,
                "gen_ai.request.temperature": req.temperature,
                "gen_ai.request.top_p": req.top_p,
                "gen_ai.request.seed": req.seed,
                "gen_ai.request.choice.count": req.n,
            }
        )
        await _admit(
            request, services, call, sum(len(p) for p in prompts), max_tokens * req.n * len(prompts)
        )
        return CallResponse(call, answer)

    @post(
        "/embeddings",
        status_code=200,
        operation_class=docs.operation(
            "createEmbedding",
            "Create embedding vectors of the input",
            tag="OpenAI",
            body=EmbeddingRequest,
            answers={200: docs.json(CreateEmbeddingResponse, "The embeddings.", **docs.COST)},
            errors=_MODEL_ERRORS,
            metered=True,
            examples={
                "text": {"model": "minilm", "input": "Hello"},
                "base64": {
                    "model": "minilm",
                    "input": ["Hello", "World"],
                    "encoding_format": "base64",
                },
            },
        ),
    )
    async def embeddings(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[Services],
    ) -> Response[Any]:
        # One dependency: litestar resolves several in a task group, a cost on every call.
        host, settings = services.host, services.settings
        req = decode(await request.body(), EmbeddingRequest)
        engine, _adapter = _engine(host, req.model)
        call = _open_call(request, services, "embeddings", engine)
        if not isinstance(engine, EmbeddingEngine):
            raise InvalidRequest(
                f"The model `{req.model}` does not produce embeddings.",
                param="model",
                code="model_not_supported",
            )
        inputs = _embedding_inputs(req.input, settings.max_embedding_inputs)
        try:
            token_lists = [engine.tokenize(i) if isinstance(i, str) else i for i in inputs]
            for ids in token_lists:
                engine.check_prompt(ids, 0)
        except ServingError as exc:
            raise api_error(exc) from exc
        if req.dimensions is not None and req.dimensions != engine.dimensions:
            raise InvalidRequest(
                f"This model produces {engine.dimensions} dimensions; "
                "it cannot shorten its embeddings.",
                param="dimensions",
            )
        await _admit(request, services, call, sum(map(len, token_lists)), 0)
        return CallResponse(call, _Embeddings(call, engine, token_lists, req.encoding_format))

    @get(
        "/models",
        operation_class=docs.operation(
            "listModels",
            "List the models the key may use",
            tag="OpenAI",
            answers={200: docs.json(ModelList, "The models.")},
        ),
    )
    async def list_models(
        self, request: Request[Any, Any, Any], host: NamedDependency[EngineHost]
    ) -> Response[bytes]:
        principal = principal_of(request.scope)
        cards = []
        for spec in host.catalog:
            names = [spec.name, *(f"{spec.name}:{a.name}" for a in spec.adapters)]
            for name in names:
                if principal is None or principal.may_use(spec.name) or principal.may_use(name):
                    cards.append(_model_card(name))
        return _json({"object": "list", "data": cards})

    @get(
        "/models/{model_id:path}",
        operation_class=docs.operation(
            "retrieveModel",
            "Retrieve a model by name or alias",
            tag="OpenAI",
            answers={200: docs.json(Model, "The model.")},
            errors=(404,),
            params={"model_id": {"description": "A model's name or alias."}},
        ),
    )
    async def get_model(
        self,
        model_id: FromPath[str],
        request: Request[Any, Any, Any],
        host: NamedDependency[EngineHost],
    ) -> Response[bytes]:
        wanted = model_id.lstrip("/")
        found = host.catalog.resolve(wanted)
        principal = principal_of(request.scope)
        if found is None:
            raise ModelNotFound(wanted)
        spec, adapter = found
        name = f"{spec.name}:{adapter.name}" if adapter is not None else spec.name
        if principal is not None and not (principal.may_use(spec.name) or principal.may_use(name)):
            raise ModelNotFound(wanted)
        return _json(_model_card(name))


class _Embeddings:
    """The answer of one embeddings call."""

    def __init__(
        self, call: Call, engine: EmbeddingEngine, inputs: list[list[int]], encoding: str
    ) -> None:
        self.call = call
        self.engine = engine
        self.inputs = inputs
        self.encoding = encoding

    async def __call__(self, send: Send) -> None:
        call = self.call
        try:
            with call.obs.engine_span("engine.embed"):
                batch = await self.engine.embed(self.inputs, call.request_id)
        except ServingError as exc:
            call.close(outcome_of(exc), type(exc).__name__)
            await send_error(send, api_error(exc))
            return
        call.usage.prompt_tokens = batch.prompt_tokens
        event = await call.commit()
        data = []
        for i, raw in enumerate(batch.vectors):
            vector: Any
            if self.encoding == "base64":
                vector = base64.b64encode(raw).decode()
            else:
                vector = array.array("f", raw).tolist()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        body = {
            "object": "list",
            "data": data,
            "model": self.engine.name,
            "usage": {"prompt_tokens": batch.prompt_tokens, "total_tokens": batch.prompt_tokens},
        }
        headers = cost_header(event) if event else {}
        if batch.cold_start_ms:
            headers["x-tollgate-cold-start-ms"] = f"{batch.cold_start_ms:.0f}"
        await send_json(send, 200, _encode(body), headers)


_CREATED = int(time.time())


#: Catalog entry (by identity, kept alive here) to its digest.
_DIGESTS: dict[int, tuple[ModelSpec, str]] = {}


def _digest(spec: ModelSpec) -> str:
    """A digest of a model's catalog entry: answers of a model reconfigured under the same
    name are not those of the old one."""
    known = _DIGESTS.get(id(spec))
    if known is not None and known[0] is spec:
        return known[1]
    digest = hashlib.blake2b(msgspec.json.encode(spec), digest_size=12).hexdigest()
    if len(_DIGESTS) > 1024:
        _DIGESTS.clear()
    _DIGESTS[id(spec)] = (spec, digest)
    return digest


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": _CREATED, "owned_by": "tollgate"}


def _embedding_inputs(raw: TextOrTokens, limit: int) -> list[str | list[int]]:
    items = _split_inputs(raw, "input")
    if len(items) > limit:
        raise InvalidRequest(f"input may hold at most {limit} items.", param="input")
    if any(not item for item in items):
        raise InvalidRequest("input must not contain empty strings or arrays.", param="input")
    return items
