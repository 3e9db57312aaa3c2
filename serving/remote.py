"""The engines of a gateway in front of workers: the same interface, served over the wire.

`RemoteHost` follows the registry (`serving.registry`): every model some worker serves is in
its catalog, with an engine here that loads the model's tokenizer (so that requests are
checked, counted and admitted before they leave) and sends the engine work to a worker the
`serving.router.Router` chooses. The worker runs the same `GenerationEngine` (fair queue,
pool, metering) on the structs of `serving.wire`; chunks come back as they were made there.

Failures: a worker that cannot be reached, refuses the call (draining, not ready, queue
full) or fails before its first chunk is left out for a few seconds and the call goes to the
next worker, up to ``attempts`` workers. After the first chunk a failure is the caller's
`EngineDead`: the client gets a clean error, and the gateway records the call once, with
what was served.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import msgspec

from serving.catalog import Catalog, CatalogError, ModelSpec
from serving.engine import (
    EmbeddingBatch,
    EngineDead,
    EngineNotReady,
    EngineState,
    EngineStats,
    GenerationChunk,
    ModelEngine,
    SamplingOptions,
    ServingError,
)
from serving.fairqueue import RequestContext
from serving.host import EngineHost
from serving.pool import ModelPool, ModelStatus, PlacedModel, Placement
from serving.registry import WorkerRegistry
from serving.router import Route, Router, prefix_hashes
from serving.signing import Signer
from serving.vllm_engine import VllmEmbeddingEngine, VllmGenerationEngine
from serving.wire import (
    ChunkLine,
    EmbedCall,
    GenerateCall,
    WireError,
    WorkerInfo,
    raise_error,
)

__all__ = ["RemoteHost"]

logger = logging.getLogger(__name__)

_encode = msgspec.json.Encoder().encode
_lines = msgspec.json.Decoder(ChunkLine | WireError)
_batch = msgspec.json.Decoder(EmbeddingBatch)
_error = msgspec.json.Decoder(WireError)
#: Errors of a worker that another worker may not have.
_RETRY = frozenset({"not_ready", "queue_full", "dead", "unknown_model", "internal"})
_STATE_RANK = {
    "ready": 0,
    "waking": 1,
    "starting": 2,
    "sleeping": 3,
    "stopping": 4,
    "cold": 5,
    "failed": 6,
}


class _Remote:
    """What the remote engines share: no engine of their own (the workers start and stop
    theirs), and the fleet's figures of their model."""

    fleet: RemoteHost
    spec: ModelSpec

    async def start(self) -> None:
        return None

    async def shutdown(self) -> None:
        return None

    def stats(self) -> EngineStats:
        return self.fleet.model_stats(self.spec.name)

    @property
    def state(self) -> EngineState:
        return self.stats().state


class RemoteGenerationEngine(_Remote, VllmGenerationEngine):
    def __init__(self, spec: ModelSpec, fleet: RemoteHost) -> None:
        super().__init__(spec)
        self.fleet = fleet

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
        self.check_request(prompt, options, adapter)
        call = GenerateCall(
            model=self.spec.name,
            prompt=prompt,
            options=options,
            request_id=request_id,
            stream=stream,
            context=context or RequestContext(),
            adapter=adapter,
        )
        return self.fleet.generate(call)


class RemoteEmbeddingEngine(_Remote, VllmEmbeddingEngine):
    def __init__(self, spec: ModelSpec, fleet: RemoteHost) -> None:
        super().__init__(spec)
        self.fleet = fleet

    async def embed(self, inputs: Sequence[list[int]], request_id: str) -> EmbeddingBatch:
        for ids in inputs:
            self.check_prompt(ids, 0)
        call = EmbedCall(model=self.spec.name, inputs=list(inputs), request_id=request_id)
        return await self.fleet.embed(call)


class RemoteHost(EngineHost):
    """A gateway's engines when workers hold the devices (``TOLLGATE_ENGINES=workers``).

    Args:
        registry: Where workers publish themselves.
        router: Chooses a worker per request.
        secret: Signs the calls (`serving.signing`).
        refresh_s: How often the registry is read.
        attempts: Workers tried per request before the caller gets the error.
        tracer: Spans of the route step (``None``: no spans).
    """

    def __init__(
        self,
        registry: WorkerRegistry,
        router: Router,
        secret: bytes,
        *,
        refresh_s: float = 0.5,
        attempts: int = 3,
        tracer: Any = None,
    ) -> None:
        self.catalog = Catalog([])
        self.progress = None
        self.local = False
        self.started = False
        self.registry = registry
        self.router = router
        self.attempts = attempts
        self.refresh_s = refresh_s
        self.tracer = tracer
        self._signer = Signer(secret)
        self._engines: dict[str, ModelEngine] = {}
        self._documents: dict[str, bytes] = {}
        #: Entries whose tokenizer did not load here, and when that was tried.
        self._failed_at: dict[bytes, float] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self.pool = ModelPool([], budget_gb=1.0)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=2.0, read=600.0, write=30.0, pool=30.0),
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256),
        )
        self._loop: asyncio.Task[None] | None = None
        self._refreshed_at = 0.0

    # The fleet's view

    async def start(self) -> None:
        await self.refresh()
        self._loop = asyncio.get_running_loop().create_task(self._follow())
        self.started = True
        logger.info(
            "following %d worker(s) serving %s",
            len(self.router.workers),
            ", ".join(self._engines) or "no models yet",
        )

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception as exc:  # Redis away: keep the last view, try again
                logger.warning("could not read the worker registry: %s", exc)

    async def refresh(self) -> None:
        """Read the registry: the router's view, and an engine per model the workers serve."""
        workers = await self.registry.workers()
        self.router.update(workers)
        self._refreshed_at = time.monotonic()
        documents: dict[str, bytes] = {}
        for worker in workers:
            for model in worker.models:
                documents.setdefault(model.name, model.spec)
        changed = False
        now = time.monotonic()
        for name, document in documents.items():
            if self._documents.get(name) == document:
                continue
            if self._failed_at.get(document, -1e9) > now - 30.0:
                continue  # tried lately; logged then
            try:
                spec = msgspec.json.decode(document, type=ModelSpec)
                engine = self._make(spec)
                await asyncio.to_thread(engine.load_tokenizer)
            except Exception as exc:
                logger.warning("model %s of the workers cannot be served here: %s", name, exc)
                self._failed_at[document] = now
                continue
            self._engines[name] = engine
            self._documents[name] = document
            changed = True
        for gone in set(self._engines) - set(documents):
            del self._engines[gone]
            del self._documents[gone]
            changed = True
        if changed:
            try:
                self.catalog = Catalog([e.spec for e in self._engines.values()])
            except CatalogError as exc:
                logger.warning("the workers' catalogs disagree: %s", exc)

    def _make(self, spec: ModelSpec) -> ModelEngine:
        if spec.kind == "embedding":
            return RemoteEmbeddingEngine(spec, self)
        return RemoteGenerationEngine(spec, self)

    async def shutdown(self) -> None:
        self.started = False
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
        await self._client.aclose()
        with contextlib.suppress(Exception):
            await self.registry.close()

    async def deploy(self, spec: ModelSpec) -> None:
        raise CatalogError("this gateway's models are its workers'; change their models files")

    def retire(self, name: str) -> bool:
        raise CatalogError("this gateway's models are its workers'; change their models files")

    @property
    def ready(self) -> bool:
        return self.started and any(not w.draining for w in self.router.workers)

    def workers(self) -> list[WorkerInfo]:
        return self.router.workers

    def model_stats(self, name: str) -> EngineStats:
        holders = self.router.holders(name)
        stats = EngineStats()
        if not holders:
            return stats
        best = min(holders, key=lambda h: _STATE_RANK.get(h[1].state, 9))[1].state
        stats.state = EngineState(best)
        stats.ready = any(m.state == "ready" and not w.draining for w, m in holders)
        stats.running = sum(m.inflight for _, m in holders)
        stats.queued = sum(sum(m.queued.values()) for _, m in holders)
        stats.kv_cache_usage = max(m.kv_cache_usage for _, m in holders)
        return stats

    def models_status(self) -> list[ModelStatus]:
        rows = []
        for name, engine in self._engines.items():
            holders = self.router.holders(name)
            stats = self.model_stats(name)
            rows.append(
                ModelStatus(
                    name=name,
                    kind=engine.spec.kind,
                    aliases=engine.spec.aliases,
                    state=stats.state,
                    memory_gb=max((m.memory_gb for _, m in holders), default=0.0),
                    memory_measured=False,
                    pinned=engine.spec.pin,
                    idle_timeout_s=engine.spec.idle_timeout_s,
                    inflight=sum(m.inflight for _, m in holders),
                    idle_s=None,
                    requests_per_min=0,
                    tokens_per_min=0,
                    cold_starts=0,
                    last_cold_start_ms=None,
                    cold_start_ms_total=0.0,
                    evictions=0,
                    idle_stops=0,
                )
            )
        return rows

    def placement(self) -> Placement:
        workers = self.router.workers
        models = self.models_status()
        budget = sum(w.budget_gb for w in workers)
        resident = sorted(
            {m.name for w in workers for m in w.models if m.state in ("ready", "starting")}
        )
        return Placement(
            budget_gb=round(budget, 3),
            used_gb=round(sum(w.used_gb for w in workers), 3),
            sleep_mode=False,
            resident=resident,
            models=[
                PlacedModel(
                    name=m.name,
                    state=m.state,
                    memory_gb=m.memory_gb,
                    share=round(m.memory_gb / budget, 4) if budget and m.name in resident else 0,
                    requests_per_min=0,
                    tokens_per_min=0,
                    cold_starts=0,
                    last_cold_start_ms=None,
                )
                for m in models
            ],
        )

    # Calls

    def _route(self, model: str, hashes: list[str], tried: set[str]) -> Route:
        route = self.router.choose(model, hashes, exclude=frozenset(tried))
        if route is None:
            if tried:
                raise EngineDead(
                    f"no worker could serve `{model}` now; please retry shortly.",
                    retry_after_s=2.0,
                )
            raise EngineNotReady(
                f"no worker serves the model `{model}` now; please retry shortly.",
                retry_after_s=2.0,
            )
        return route

    def _attempt(
        self, model: str, hashes: list[str], tried: set[str], last: ServingError | None
    ) -> Route:
        """The next worker to try, started; when none is left, the last attempt's error (or,
        at the first attempt, why no worker serves the model)."""
        try:
            route = self._route(model, hashes, tried)
        except ServingError:
            if last is not None:
                raise last from None
            raise
        tried.add(route.worker.id)
        self.router.started(route, hashes)
        return route

    def _headers(self, path: str, body: bytes) -> dict[str, str]:
        from opentelemetry.propagate import inject

        headers = self._signer.headers("POST", path, body)
        headers["content-type"] = "application/json"
        inject(headers)  # W3C trace context of the current span (the gateway's engine span)
        return headers

    def _span(self, route: Route, model: str) -> Any:
        if self.tracer is None:
            return contextlib.nullcontext()
        return self.tracer.start_as_current_span(
            "route",
            attributes={
                "gen_ai.request.model": model,
                "tollgate.worker": route.worker.id,
                "tollgate.route.reason": route.reason,
                "tollgate.route.matched_blocks": route.matched_blocks,
                "tollgate.device.kind": route.worker.device_kind,
            },
        )

    async def generate(self, call: GenerateCall) -> AsyncIterator[GenerationChunk]:
        path = "/internal/v1/generate"
        body = _encode(call)
        hashes = prefix_hashes(call.model, call.prompt, call.context.cache_salt)
        tried: set[str] = set()
        last: ServingError | None = None
        for _ in range(self.attempts):
            route = self._attempt(call.model, hashes, tried, last)
            worker = route.worker
            yielded = False
            try:
                with self._span(route, call.model):
                    headers = self._headers(path, body)
                    request = self._client.build_request(
                        "POST", worker.url + path, content=body, headers=headers
                    )
                    try:
                        response = await self._client.send(request, stream=True)
                    except httpx.TransportError as exc:
                        self._failed(worker, exc)
                        last = EngineDead(f"a worker for `{call.model}` could not be reached")
                        continue
                    try:
                        if response.status_code != 200:
                            error = await self._error_of(response)
                            if error.kind not in _RETRY:
                                raise raise_error(error)
                            if error.kind in ("dead", "internal"):
                                self.router.mark_down(worker.id, 2.0)
                            last = raise_error(error)
                            continue
                        async for line in response.aiter_lines():
                            if not line:
                                continue
                            item = _lines.decode(line)
                            if isinstance(item, WireError):
                                raise raise_error(item)
                            yielded = True
                            chunk = item.chunk
                            chunk.device = worker.device_kind
                            chunk.device_cost_per_hour = worker.cost_per_hour
                            yield chunk
                        return
                    except (httpx.TransportError, msgspec.DecodeError) as exc:
                        self._failed(worker, exc)
                        if yielded:
                            raise EngineDead(
                                f"the worker serving `{call.model}` stopped during the answer; "
                                "please retry.",
                                retry_after_s=1.0,
                            ) from exc
                        last = EngineDead(f"the worker for `{call.model}` stopped")
                        continue
                    finally:
                        await response.aclose()
            finally:
                self.router.ended(worker.id)
        assert last is not None
        raise last

    async def embed(self, call: EmbedCall) -> EmbeddingBatch:
        path = "/internal/v1/embed"
        body = _encode(call)
        hashes = prefix_hashes(call.model, call.inputs[0] if call.inputs else [])
        tried: set[str] = set()
        last: ServingError | None = None
        for _ in range(self.attempts):
            route = self._attempt(call.model, hashes, tried, last)
            worker = route.worker
            try:
                with self._span(route, call.model):
                    try:
                        response = await self._client.post(
                            worker.url + path, content=body, headers=self._headers(path, body)
                        )
                    except httpx.TransportError as exc:
                        self._failed(worker, exc)
                        last = EngineDead(f"a worker for `{call.model}` could not be reached")
                        continue
                    if response.status_code == 200:
                        batch = _batch.decode(response.content)
                        batch.device = worker.device_kind
                        batch.device_cost_per_hour = worker.cost_per_hour
                        return batch
                    error = await self._error_of(response)
                    if error.kind not in _RETRY:
                        raise raise_error(error)
                    last = raise_error(error)
            finally:
                self.router.ended(worker.id)
        assert last is not None
        raise last

    def _failed(self, worker: WorkerInfo, exc: BaseException) -> None:
        logger.warning("worker %s failed a call: %s", worker.id, type(exc).__name__)
        self.router.mark_down(worker.id)

    async def _error_of(self, response: httpx.Response) -> WireError:
        body = await response.aread()
        try:
            return _error.decode(body)
        except msgspec.DecodeError:
            return WireError("internal", f"the worker answered {response.status_code}")
