"""The OpenAI-compatible routes: chat, completions, embeddings and models."""

from __future__ import annotations

import array
import base64
import time
from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from billing.events import EventStatus
from gateway.admission import Ticket
from gateway.api._generation import Generation, api_error, json_response
from gateway.api._render import Flavor
from gateway.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    TextOrTokens,
    decode,
)
from gateway.auth import Principal, principal_of
from gateway.errors import InvalidRequest, ModelNotFound, PermissionDenied
from gateway.middleware import add_response_headers, request_id_of
from gateway.observe import Observation
from gateway.services import Services
from gateway.settings import Settings
from gateway.telemetry import Telemetry
from gateway.usage import Receipt, cost_header
from serving import (
    EngineHost,
    GenerationEngine,
    SamplingOptions,
    ServingError,
)

__all__ = ["OpenAIController"]


def _receipt(request: Request[Any, Any, Any], services: Services, operation: str) -> Receipt | None:
    """How this request's usage event is made; ``None`` when nobody is billed (auth off)."""
    principal = principal_of(request.scope)
    if principal is None or principal.tenant_id is None:
        return None
    return Receipt(services.usage, principal, operation, request.scope.setdefault("state", {}))


def _check_allowed(request: Request[Any, Any, Any], model: str) -> Principal | None:
    state = request.scope.setdefault("state", {})
    state["model"] = model  # for the usage event of a request that fails from here on
    principal = principal_of(request.scope)
    if principal is not None and principal.operator:
        # Work must land on a tenant's bill: the operator's token is for /admin/v1 only.
        raise PermissionDenied(
            "The admin token cannot call models; use an API key of a tenant.",
            code="admin_token_not_allowed",
        )
    if principal is not None and not principal.may_use(model):
        raise PermissionDenied(
            f"This API key may not use the model `{model}`.",
            param="model",
            code="model_not_allowed",
        )
    return principal


async def _admit(
    request: Request[Any, Any, Any],
    services: Services,
    model: str,
    prompt_tokens: int,
    max_output_tokens: int,
) -> Ticket:
    """Reserve quota for this request; its ``x-ratelimit-*`` headers go on any answer."""
    ticket = await services.admission.admit(
        principal_of(request.scope),
        request_id_of(request.scope),
        model,
        prompt_tokens,
        max_output_tokens,
    )
    add_response_headers(request.scope, ticket.headers)
    return ticket


def _generation_engine(
    request: Request[Any, Any, Any], host: NamedDependency[EngineHost], model: str
) -> GenerationEngine:
    engine = host.get(model)
    if engine is None:
        raise ModelNotFound(model)
    _check_allowed(request, engine.name)
    if not isinstance(engine, GenerationEngine):
        raise InvalidRequest(
            f"The model `{model}` is an embedding model; use /v1/embeddings.",
            param="model",
            code="model_not_supported",
        )
    return engine


def _check_n(n: int, settings: NamedDependency[Settings]) -> None:
    if n > settings.max_n:
        raise InvalidRequest(f"n must be at most {settings.max_n}.", param="n")


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
        host: NamedDependency[EngineHost],
        settings: NamedDependency[Settings],
        telemetry: NamedDependency[Telemetry],
        services: NamedDependency[Services],
    ) -> Response[Any]:
        req = decode(await request.body(), ChatCompletionRequest)
        engine = _generation_engine(request, host, req.model)
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
            raise api_error(exc) from exc
        max_tokens = req.max_completion_tokens or req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs to be true.", param="top_logprobs")
        return await self._start(
            "chat", request, engine, [prompt], req, max_tokens, logprobs, telemetry, services
        )

    @post("/completions", status_code=200)
    async def completions(
        self,
        request: Request[Any, Any, Any],
        host: NamedDependency[EngineHost],
        settings: NamedDependency[Settings],
        telemetry: NamedDependency[Telemetry],
        services: NamedDependency[Services],
    ) -> Response[Any]:
        req = decode(await request.body(), CompletionRequest)
        engine = _generation_engine(request, host, req.model)
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
            raise api_error(exc) from exc
        return await self._start(
            "text", request, engine, prompts, req, req.max_tokens, req.logprobs, telemetry, services
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
        services: Services,
    ) -> Response[Any]:
        longest = max(len(p) for p in prompts)
        if max_tokens is None:
            max_tokens = max(engine.max_model_len - longest, 1)
        try:
            for prompt in prompts:  # before admission: a bad request reserves nothing
                engine.check_prompt(prompt, max_tokens)
        except ServingError as exc:
            raise api_error(exc) from exc
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
        ticket = await _admit(
            request,
            services,
            engine.name,
            sum(len(p) for p in prompts),
            max_tokens * req.n * len(prompts),
        )
        request_id = ticket.request_id
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
        gen = Generation(
            flavor=flavor,
            engine=engine,
            prompts=prompts,
            options=options,
            request_id=request_id,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            obs=obs,
            stream=req.stream,
            ticket=ticket,
            receipt=_receipt(request, services, obs.operation),
        )
        if req.stream:
            return await gen.open_stream()
        return await gen.complete(request)

    @post("/embeddings", status_code=200)
    async def embeddings(
        self,
        request: Request[Any, Any, Any],
        host: NamedDependency[EngineHost],
        settings: NamedDependency[Settings],
        telemetry: NamedDependency[Telemetry],
        services: NamedDependency[Services],
    ) -> Response[bytes]:
        req = decode(await request.body(), EmbeddingRequest)
        engine = host.get(req.model)
        if engine is None:
            raise ModelNotFound(req.model)
        _check_allowed(request, engine.name)
        from serving import EmbeddingEngine

        if not isinstance(engine, EmbeddingEngine):
            raise InvalidRequest(
                f"The model `{req.model}` does not produce embeddings.",
                param="model",
                code="model_not_supported",
            )
        inputs = _embedding_inputs(req.input, settings.max_embedding_inputs)
        try:
            token_lists = [engine.tokenize(i) if isinstance(i, str) else i for i in inputs]
        except ServingError as exc:
            raise api_error(exc) from exc
        ticket = await _admit(request, services, engine.name, sum(map(len, token_lists)), 0)
        request_id = ticket.request_id
        obs = Observation(telemetry, "embeddings", engine.name, request_id)
        receipt = _receipt(request, services, "embeddings")
        prompt_tokens = sum(map(len, token_lists))

        def failed(status: EventStatus, tokens: int) -> None:
            if receipt is not None:
                event = receipt.event(
                    request_id,
                    model=engine.name,
                    status=status,
                    prompt_tokens=tokens,
                    started=obs.started,
                )
                services.usage.record_later(event)

        try:
            with obs.engine_span("engine.embed"):
                batch = await engine.embed(token_lists, request_id)
        except ServingError as exc:
            ticket.settle(0, 0)
            obs.finish(error=type(exc).__name__)
            failed(EventStatus.ERROR, 0)
            raise api_error(exc) from exc
        except BaseException as exc:
            ticket.settle(prompt_tokens, 0)
            obs.finish(error=type(exc).__name__, outcome="aborted")
            failed(EventStatus.ABORTED, prompt_tokens)
            raise
        ticket.settle(batch.prompt_tokens, 0)
        if req.dimensions is not None and req.dimensions != batch.dimensions:
            obs.finish(error="InvalidRequest")
            failed(EventStatus.ERROR, batch.prompt_tokens)
            raise InvalidRequest(
                f"This model produces {batch.dimensions} dimensions; "
                "it cannot shorten its embeddings.",
                param="dimensions",
            )
        obs.finish(input_tokens=batch.prompt_tokens)
        receipt_headers: dict[str, str] = {}
        if receipt is not None:
            event = receipt.event(
                request_id,
                model=engine.name,
                status=EventStatus.OK,
                prompt_tokens=batch.prompt_tokens,
                started=obs.started,
            )
            await services.usage.record(event)  # durable before the answer leaves
            receipt_headers = cost_header(event)
        data = []
        for i, raw in enumerate(batch.vectors):
            vector: Any
            if req.encoding_format == "base64":
                vector = base64.b64encode(raw).decode()
            else:
                vector = array.array("f", raw).tolist()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        response = json_response(
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
        response.headers.update(receipt_headers)
        return response

    @get("/models")
    async def list_models(
        self, request: Request[Any, Any, Any], host: NamedDependency[EngineHost]
    ) -> Response[bytes]:
        principal = principal_of(request.scope)
        cards = [
            _model_card(s.name)
            for s in host.catalog
            if principal is None or principal.may_use(s.name)
        ]
        return json_response({"object": "list", "data": cards})

    @get("/models/{model_id:path}")
    async def get_model(
        self,
        model_id: FromPath[str],
        request: Request[Any, Any, Any],
        host: NamedDependency[EngineHost],
    ) -> Response[bytes]:
        spec = host.catalog.get(model_id.lstrip("/"))
        principal = principal_of(request.scope)
        if spec is None or (principal is not None and not principal.may_use(spec.name)):
            raise ModelNotFound(model_id.lstrip("/"))
        return json_response(_model_card(spec.name))


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
