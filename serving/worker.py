"""``tollgate worker``: one device's model pool, served to gateways over signed HTTP.

The worker runs an `EngineHost` (the model pool of the device) and answers gateways::

    POST /internal/v1/generate    GenerateCall → newline-delimited JSON: ChunkLine | WireError
    POST /internal/v1/embed       EmbedCall → EmbeddingBatch (or WireError)
    POST /internal/v1/tokenize    TokenizeCall → token ids (for a gateway without the tokenizer)
    GET  /internal/v1/info        its WorkerInfo
    GET  /healthz, /readyz        liveness; readiness (503 while starting or draining)
    GET  /metrics                 the engines' and the pool's figures (the admin token)

Every ``/internal`` call must be signed (`serving.signing`); others are refused with 401.
The worker listens on loopback unless told otherwise. It publishes its `WorkerInfo` in the
registry (`serving.registry`) every ``heartbeat_s``: device kind, memory, cost per hour,
models and their states, queue depth per class, KV cache use, and the block hashes of the
prompts it served lately (the router's prefix affinity).

A generation answer's status line waits for the first chunk: an error before it (a cold
start that timed out, a full queue, an engine that died) is an HTTP error the gateway may
retry on another worker; once the first chunk is out, errors travel in the stream.

On SIGTERM the worker drains: it says ``draining`` in the registry at once, refuses new
calls (503), finishes the streams it has (for up to ``drain_timeout_s``), stops its engines
and removes itself from the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import msgspec

from serving.engine import EmbeddingEngine, GenerationEngine, ServingError
from serving.host import EngineHost
from serving.placement import detect_device_kind
from serving.registry import WorkerRegistry
from serving.router import prefix_hashes
from serving.signing import SignatureError, Verifier
from serving.wire import (
    ChunkLine,
    EmbedCall,
    GenerateCall,
    ModelOnWorker,
    TokenizeCall,
    WireError,
    WorkerInfo,
    error_of,
)

__all__ = ["Worker", "WorkerSettings", "detect_device_kind", "run_worker"]

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_MAX_BODY = 64 * 1024 * 1024
_encode = msgspec.json.Encoder().encode
_STATUS = {
    "invalid": 400,
    "unknown_model": 404,
    "not_ready": 503,
    "queue_full": 503,
    "dead": 503,
    "internal": 500,
}


class WorkerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """A worker's settings, from ``TOLLGATE_*`` variables as the gateway's are."""

    host: str = "127.0.0.1"
    port: int = 8100
    #: How gateways reach it (unset: ``http://{host}:{port}``; set it when ``host`` is a
    #: wildcard address).
    worker_url: str | None = None
    #: Its name in the registry (unset: the host name and port).
    worker_id: str | None = None
    #: ``cpu``, ``cuda``, ``rocm``, ... (unset: vLLM's platform's device type).
    device_kind: str | None = None
    #: What an hour of the device costs, in USD: prices the engine time it bills.
    device_cost_per_hour: str = "0"
    redis_url: str | None = None
    #: Shared with the gateways: their calls are signed under it.
    secret: str | None = None
    #: Required on ``/metrics`` when set.
    admin_token: str | None = None
    deployment: Annotated[str, msgspec.Meta(min_length=1, max_length=100)] = "default"
    models: str | None = None
    data_dir: str = ".tollgate"
    device_memory_gb: Annotated[float, msgspec.Meta(gt=0)] | None = None
    cold_start_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 120.0
    idle_timeout_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    engine_wait_s: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    #: How long a draining worker lets its streams run before it stops anyway.
    drain_timeout_s: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    heartbeat_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    log_level: str = "INFO"
    engine_log: str | None = None

    def __post_init__(self) -> None:
        try:
            cost = Decimal(self.device_cost_per_hour)
            valid = cost.is_finite() and cost >= 0 and cost == cost.quantize(Decimal("1e-6"))
        except ArithmeticError:
            valid = False
        if not valid:
            raise ValueError(
                "device_cost_per_hour must be a non-negative decimal with at most six "
                f"decimals, got {self.device_cost_per_hour!r}"
            )

    def __repr__(self) -> str:
        hidden = {"secret", "admin_token"}
        shown = {
            f: ("***" if f in hidden and v else v)
            for f, v in msgspec.structs.asdict(self).items()
            if f != "redis_url"
        }
        return f"WorkerSettings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    __str__ = __repr__

    @classmethod
    def from_env(
        cls, env: MutableMapping[str, str] | None = None, **overrides: object
    ) -> WorkerSettings:
        """Raises:
        ValueError: a variable does not parse as its field's type."""
        env = os.environ if env is None else env
        raw: dict[str, object] = {}
        for field in msgspec.structs.fields(cls):
            value = env.get(f"TOLLGATE_{field.name.upper()}")
            if value:
                raw[field.name] = value
        raw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid setting: {exc} (TOLLGATE_<FIELD> variables)") from exc


async def _body(receive: Receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_BODY:
            raise ValueError("body too large")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes, kind: str = "application/json") -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", kind.encode()), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Worker:
    """The ASGI app of one worker, its heartbeat and its drain."""

    def __init__(
        self,
        settings: WorkerSettings,
        host: EngineHost,
        secret: bytes,
        *,
        registry: WorkerRegistry | None = None,
        tracer_provider: Any = None,
    ) -> None:
        from opentelemetry import trace

        self.settings = settings
        self.host = host
        self.registry = registry
        self.verifier = Verifier(secret)
        self.id = settings.worker_id or f"{socket.gethostname()}-{settings.port}"
        self.url = settings.worker_url or f"http://{settings.host}:{settings.port}"
        self.device_kind = settings.device_kind or detect_device_kind()
        self.started_at = time.time()
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        #: Block hashes of the prompts served lately, newest last.
        self.prefixes: deque[str] = deque(maxlen=2048)
        self._tracer_provider = tracer_provider
        provider = tracer_provider or trace.NoOpTracerProvider()
        self.tracer = provider.get_tracer("tollgate.worker")
        self._tasks: list[asyncio.Task[None]] = []
        self._start_error: str | None = None
        from prometheus_client import CollectorRegistry

        from serving.metrics import EngineCollector

        self.metrics = CollectorRegistry(auto_describe=False)
        self.metrics.register(EngineCollector(host))

    # The registry

    def info(self) -> WorkerInfo:
        placement = self.host.placement()
        models = []
        stats = self.host.stats()
        for row in self.host.models_status():
            engine = self.host.get(row.name)
            if engine is None:
                continue
            queue = getattr(engine, "queue", None)
            queued = queue.waiting_by_class() if queue is not None else {}
            models.append(
                ModelOnWorker(
                    name=row.name,
                    state=row.state.value,
                    memory_gb=row.memory_gb,
                    inflight=row.inflight,
                    spec=msgspec.json.encode(engine.spec),
                    queued=dict(queued),
                    kv_cache_usage=stats[row.name].kv_cache_usage if row.name in stats else 0.0,
                )
            )
        return WorkerInfo(
            id=self.id,
            url=self.url,
            device_kind=self.device_kind,
            cost_per_hour=self.settings.device_cost_per_hour,
            budget_gb=placement.budget_gb,
            used_gb=placement.used_gb,
            models=models,
            prefixes=list(self.prefixes),
            inflight=self.inflight,
            draining=self.draining,
            started_at=self.started_at,
        )

    async def publish(self) -> None:
        if self.registry is None:
            return
        try:
            await self.registry.publish(self.info())
        except Exception as exc:  # Redis away: the next beat tries again
            logger.warning("could not publish to the registry: %s", exc)

    async def _heartbeat(self) -> None:
        while True:
            await self.publish()
            await asyncio.sleep(self.settings.heartbeat_s)

    def drain(self) -> None:
        """Stop taking work (from a signal handler or a call): say so in the registry now."""
        if self.draining:
            return
        self.draining = True
        logger.info("draining: %d call(s) in flight", self.inflight)
        self._tasks.append(asyncio.get_running_loop().create_task(self.publish()))

    async def wait_idle(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    # ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/healthz":
            await _respond(send, 200, b'{"status":"ok"}')
            return
        if path == "/readyz":
            await self._readyz(send)
            return
        if path == "/metrics":
            await self._metrics(scope, send)
            return
        if not path.startswith("/internal/v1/"):
            await _respond(send, 404, _encode(WireError("unknown_model", "no such route")))
            return
        try:
            body = await _body(receive)
        except ConnectionResetError:
            return
        except ValueError:
            await _respond(send, 413, _encode(WireError("invalid", "body too large")))
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            self.verifier.verify(method, path, body, headers)
        except SignatureError as exc:
            logger.warning("refused an internal call to %s: %s", path, exc)
            await _respond(send, 401, _encode(WireError("invalid", "call refused")))
            return
        try:
            if path == "/internal/v1/generate" and method == "POST":
                await self._generate(
                    msgspec.json.decode(body, type=GenerateCall), headers, receive, send
                )
            elif path == "/internal/v1/embed" and method == "POST":
                await self._embed(msgspec.json.decode(body, type=EmbedCall), headers, send)
            elif path == "/internal/v1/tokenize" and method == "POST":
                await self._tokenize(msgspec.json.decode(body, type=TokenizeCall), send)
            elif path == "/internal/v1/info" and method == "GET":
                await _respond(send, 200, _encode(self.info()))
            else:
                await _respond(send, 404, _encode(WireError("unknown_model", "no such route")))
        except msgspec.ValidationError as exc:
            await _respond(send, 400, _encode(WireError("invalid", f"malformed call: {exc}")))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._tasks.append(asyncio.create_task(self._start()))
                self._tasks.append(asyncio.create_task(self._heartbeat()))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _start(self) -> None:
        try:
            await self.host.start()
        except Exception as exc:
            self._start_error = f"{type(exc).__name__}: {exc}"
            logger.exception("engine start-up failed")
            return
        await self.publish()
        logger.info("worker %s ready on %s (%s)", self.id, self.url, self.device_kind)

    async def _shutdown(self) -> None:
        self.drain()
        if not await self.wait_idle(self.settings.drain_timeout_s):
            logger.warning("drain timed out with %d call(s) in flight", self.inflight)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.registry is not None:
            with contextlib.suppress(Exception):
                await self.registry.remove(self.id)
            await self.registry.close()
        await self.host.shutdown()
        if self._tracer_provider is not None:
            self._tracer_provider.shutdown()
        logger.info("worker %s stopped", self.id)

    async def _readyz(self, send: Send) -> None:
        ready = self.host.started and self.host.ready and not self.draining
        body = {
            "status": "ready" if ready else "draining" if self.draining else "starting",
            "worker": self.id,
            "error": self._start_error,
            "models": {n: msgspec.to_builtins(s) for n, s in self.host.stats().items()},
        }
        await _respond(send, 200 if ready else 503, _encode(body))

    async def _metrics(self, scope: Scope, send: Send) -> None:
        token = self.settings.admin_token
        if token:
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                await _respond(send, 401, b'{"error":"the admin token is required"}')
                return
        from prometheus_client import generate_latest

        body = generate_latest(self.metrics)
        await _respond(send, 200, body, "text/plain; version=0.0.4; charset=utf-8")

    def _enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    def _span(self, name: str, model: str, headers: dict[str, str]) -> Any:
        from opentelemetry.propagate import extract
        from opentelemetry.trace import SpanKind

        return self.tracer.start_as_current_span(
            name,
            context=extract(headers),
            kind=SpanKind.SERVER,
            attributes={"gen_ai.request.model": model, "tollgate.worker": self.id},
        )

    async def _generate(
        self, call: GenerateCall, headers: dict[str, str], receive: Receive, send: Send
    ) -> None:
        found = self.host.resolve(call.model)
        engine = found[0] if found is not None else None
        if not isinstance(engine, GenerationEngine) or found is None:
            error = WireError("unknown_model", f"the worker does not serve {call.model!r}")
            await _respond(send, 404, _encode(error))
            return
        if self.draining:
            await _respond(send, 503, _encode(WireError("not_ready", "the worker is draining")))
            return
        self._enter()
        try:
            with self._span("worker.generate", engine.name, headers) as span:
                span.set_attribute("gen_ai.operation.name", "chat")
                await self._stream(engine, call, found[1], receive, send, span)
        finally:
            self._leave()

    async def _stream(
        self,
        engine: GenerationEngine,
        call: GenerateCall,
        adapter: str | None,
        receive: Receive,
        send: Send,
        span: Any,
    ) -> None:
        try:
            stream = engine.generate(
                call.prompt,
                call.options,
                call.request_id,
                stream=call.stream,
                context=call.context,
                adapter=call.adapter or adapter,
            )
        except ServingError as exc:
            error = error_of(exc)
            await _respond(send, _STATUS[error.kind], _encode(error))
            return
        self.prefixes.extend(prefix_hashes(engine.name, call.prompt, call.context.cache_salt))
        gone = asyncio.Event()

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    return

        watcher = asyncio.create_task(watch())
        started = False
        last = None
        try:
            async for chunk in stream:
                last = chunk
                line = _encode(ChunkLine(chunk)) + b"\n"
                if not started:
                    started = True
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 200,
                            "headers": [(b"content-type", b"application/x-ndjson")],
                        }
                    )
                if gone.is_set():
                    break
                await send({"type": "http.response.body", "body": line, "more_body": True})
        except ServingError as exc:
            error = error_of(exc)
            if not started:
                await _respond(send, _STATUS[error.kind], _encode(error))
                return
            with contextlib.suppress(OSError):
                await send(
                    {
                        "type": "http.response.body",
                        "body": _encode(error) + b"\n",
                        "more_body": True,
                    }
                )
        finally:
            watcher.cancel()
            await stream.aclose()  # type: ignore[attr-defined]
            if last is not None:
                span.set_attribute("tollgate.queue_ms", last.queue_ms)
                span.set_attribute("tollgate.cold_start_ms", last.cold_start_ms)
                if last.engine_ms is not None:
                    span.set_attribute("tollgate.gpu_ms", last.engine_ms)
                span.set_attribute("gen_ai.usage.input_tokens", last.prompt_tokens)
        if started:
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _embed(self, call: EmbedCall, headers: dict[str, str], send: Send) -> None:
        engine = self.host.get(call.model)
        if not isinstance(engine, EmbeddingEngine):
            error = WireError("unknown_model", f"the worker does not serve {call.model!r}")
            await _respond(send, 404, _encode(error))
            return
        if self.draining:
            await _respond(send, 503, _encode(WireError("not_ready", "the worker is draining")))
            return
        self._enter()
        try:
            with self._span("worker.embed", engine.name, headers) as span:
                span.set_attribute("gen_ai.operation.name", "embeddings")
                try:
                    batch = await engine.embed(call.inputs, call.request_id)
                except ServingError as exc:
                    error = error_of(exc)
                    await _respond(send, _STATUS[error.kind], _encode(error))
                    return
                await _respond(send, 200, _encode(batch))
        finally:
            self._leave()

    async def _tokenize(self, call: TokenizeCall, send: Send) -> None:
        found = self.host.resolve(call.model)
        if found is None:
            error = WireError("unknown_model", f"the worker does not serve {call.model!r}")
            await _respond(send, 404, _encode(error))
            return
        engine = found[0]
        try:
            if call.messages is not None and isinstance(engine, GenerationEngine):
                ids = engine.render_chat(call.messages)
            else:
                ids = engine.tokenize(call.text or "")
        except ServingError as exc:
            error = error_of(exc)
            await _respond(send, _STATUS[error.kind], _encode(error))
            return
        await _respond(send, 200, _encode(ids))


def _secret(settings: WorkerSettings) -> bytes:
    if settings.secret:
        return settings.secret.encode()
    path = Path(settings.data_dir) / "secret"  # the embedded default's, on one machine
    if path.exists():
        return path.read_text().strip().encode()
    raise ValueError("TOLLGATE_SECRET is required: gateways sign their calls under it")


def run_worker(settings: WorkerSettings) -> int:
    """Serve until SIGTERM or SIGINT, then drain. The exit status."""
    import uvicorn

    from serving.catalog import load_catalog
    from serving.tracing import tracer_provider_from_env

    secret = _secret(settings)
    if not settings.redis_url:
        raise ValueError("TOLLGATE_REDIS_URL is required: workers register there")
    catalog = load_catalog(
        Path(settings.models) if settings.models else _default_models(), Path(settings.data_dir)
    )
    host = EngineHost(
        catalog,
        ready_wait_s=settings.engine_wait_s,
        budget_gb=settings.device_memory_gb,
        cold_start_timeout_s=settings.cold_start_timeout_s,
        idle_timeout_s=settings.idle_timeout_s,
    )
    registry = WorkerRegistry.from_url(
        settings.redis_url, settings.deployment, ttl_s=max(4.0, 4 * settings.heartbeat_s)
    )
    worker = Worker(
        settings,
        host,
        secret,
        registry=registry,
        tracer_provider=tracer_provider_from_env(service_name="tollgate-worker"),
    )

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Draining shows in the registry before the listener closes.
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_soon_threadsafe(worker.drain)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        worker,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=int(settings.drain_timeout_s) or None,
        timeout_keep_alive=30,
    )
    server = _Server(config)
    server.run()
    return 1 if worker._start_error else 0


def _default_models() -> Path:
    from serving.catalog import default_catalog_path

    return default_catalog_path()
