"""Every engine of one process: looked up by model name, resident as its device's pool decides."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

from serving.catalog import Catalog, ModelSpec
from serving.engine import (
    EmbeddingEngine,
    EngineState,
    EngineStats,
    GenerationEngine,
    ModelEngine,
)
from serving.pool import ModelPool, ModelStatus, Placement
from serving.progress import Progress

__all__ = ["EngineHost", "make_engine", "settle_process"]

logger = logging.getLogger(__name__)


def make_engine(
    spec: ModelSpec,
    engine_cpus: set[int] | None = None,
    *,
    ready_wait_s: float = 10.0,
    on_ready: Callable[[], None] | None = None,
) -> ModelEngine:
    """The engine implementation for one catalog entry."""
    from serving.vllm_engine import VllmEmbeddingEngine, VllmGenerationEngine

    kind = VllmEmbeddingEngine if spec.kind == "embedding" else VllmGenerationEngine
    return kind(spec, engine_cpus, ready_wait_s=ready_wait_s, on_ready=on_ready)


def settle_process() -> None:
    """Once the engines are up: make start-up state cheap to live with, as vLLM's server does.

    vLLM reads its environment variables on every access until told they are settled, and
    the objects that importing torch, transformers and vLLM leaves behind would otherwise
    be walked by every full garbage collection, pausing the event loop for a large part of
    a second. Freezing them takes them out of the collector's way.
    """
    import gc

    from vllm import envs

    envs.enable_envs_cache()
    gc.collect()
    gc.freeze()


class EngineHost:
    """The co-located engines of one process (one device), sharing its event loop.

    (`serving.remote.RemoteHost` offers the same to a gateway whose engines run on workers.)

    The device's `ModelPool` decides which models are resident: at start-up what fits its
    memory budget starts, pinned models first; the others start when a request needs them.
    Every model's tokenizer is loaded at start-up, resident or not.

    Args:
        catalog: The models to serve.
        ready_wait_s: How long a request waits for an engine that is restarting.
        progress: Told ``(model, phase)`` as each engine starts: ``starting``, ``ready``
            (or ``failed``); ``cold`` for a model left out at start-up.
        budget_gb: The device's memory for models (``None``: measured).
        cold_start_timeout_s: How long a request waits for its model to be brought in.
        idle_timeout_s: Models unused this long are taken off the device (``None``: never,
            unless their catalog entry says otherwise).
    """

    def __init__(
        self,
        catalog: Catalog,
        *,
        ready_wait_s: float = 10.0,
        progress: Progress | None = None,
        budget_gb: float | None = None,
        cold_start_timeout_s: float = 120.0,
        idle_timeout_s: float | None = None,
    ) -> None:
        # Weights come from disk, never from the network, unless the operator says otherwise.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from serving.vllm_engine import configure_cpu_binding

        self.catalog = catalog
        self.progress = progress
        # Nothing to split the cores for without engines (and no thread to pin).
        self._cpus = cpus = configure_cpu_binding() if catalog.models else None
        self._engines: dict[str, ModelEngine] = {
            spec.name: make_engine(
                spec, cpus, ready_wait_s=ready_wait_s, on_ready=self._engine_ready
            )
            for spec in catalog
        }
        self._ready_wait_s = ready_wait_s
        #: Engines finishing their requests before they stop (retired or replaced).
        self._retiring: set[asyncio.Task[None]] = set()
        self.pool = ModelPool(
            list(self._engines.values()),
            budget_gb=budget_gb,
            cold_start_timeout_s=cold_start_timeout_s,
            idle_timeout_s=idle_timeout_s,
            progress=progress,
        )
        self._settled = False
        #: The engines run in this process (not on workers).
        self.local = True
        #: Start-up is done: the models that fit are resident.
        self.started = False

    def _engine_ready(self) -> None:
        # Every start (at start-up, on demand, after a crash): the new engine processes
        # leave the event loop's core.
        from serving.vllm_engine import pin_engine_processes

        pin_engine_processes(self._cpus)

    async def start(self) -> None:
        """Load every tokenizer, then start what fits the device; if a start fails, stop
        the others and raise."""
        started = time.perf_counter()
        for engine in self._engines.values():
            await asyncio.to_thread(engine.load_tokenizer)
        try:
            await self.pool.start()
        except BaseException:
            await self.shutdown()
            raise
        if not self._settled:
            self._settled = True
            settle_process()
        self.started = True
        resident = [s.name for s in self.pool.status() if s.state == "ready"]
        logger.info(
            "started %d of %d engine(s) in %.1f s",
            len(resident),
            len(self._engines),
            time.perf_counter() - started,
        )

    async def shutdown(self) -> None:
        self.started = False
        for task in self._retiring:
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        await self.pool.shutdown()

    # Live changes of the catalog

    async def deploy(self, spec: ModelSpec) -> None:
        """Add a model, or apply a changed entry, without a restart.

        A change of the pool's settings alone (aliases, pin, idle timeout, declared
        footprint) applies in place; any other change (source, kind, engine arguments) makes
        a new engine, cold, for the requests from now on, while the old one finishes its own
        and stops.

        Raises:
            CatalogError: a name or alias is another model's, or the engine arguments are
                not valid.
            Exception: the model's tokenizer or configuration did not load.
        """
        catalog = self.catalog.with_model(spec)
        old = self._engines.get(spec.name)
        if old is not None and _same_engine(old.spec, spec):
            old.spec = spec
            self.pool.reconfigure(old)
            self.catalog = catalog
            return
        engine = make_engine(
            spec, self._cpus, ready_wait_s=self._ready_wait_s, on_ready=self._engine_ready
        )
        engine.check_options()
        await asyncio.to_thread(engine.load_tokenizer)
        self._engines[spec.name] = engine
        self.pool.add(engine)
        self.catalog = catalog
        if old is not None:
            self._drain(old)
        logger.info("model %s deployed", spec.name)

    def retire(self, name: str) -> bool:
        """Take a model out of the catalog: new requests for it are refused, those in flight
        finish, then its engine stops. Whether it was there."""
        engine = self._engines.pop(name, None)
        if engine is None:
            return False
        self.catalog = self.catalog.without(name)
        self._drain(engine)
        logger.info("model %s retired; its engine stops once its requests are done", name)
        return True

    def _drain(self, engine: ModelEngine) -> None:
        task = asyncio.get_running_loop().create_task(
            self.pool.retire(engine), name=f"retire-{engine.name}"
        )
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def drained(self) -> None:
        """Wait until every retired engine has stopped."""
        while self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    def engines(self) -> list[ModelEngine]:
        """Every engine, in catalog order."""
        return list(self._engines.values())

    def get(self, model: str) -> ModelEngine | None:
        """The engine serving ``model`` (a name or an alias)."""
        spec = self.catalog.get(model)
        return self._engines[spec.name] if spec is not None else None

    def resolve(self, model: str) -> tuple[ModelEngine, str | None] | None:
        """The engine serving ``model`` (a name, an alias or ``model:adapter``) and the
        adapter's name."""
        found = self.catalog.resolve(model)
        if found is None:
            return None
        spec, adapter = found
        return self._engines[spec.name], adapter.name if adapter is not None else None

    def generation(self, model: str) -> GenerationEngine | None:
        engine = self.get(model)
        return engine if isinstance(engine, GenerationEngine) else None

    def embedding(self, model: str) -> EmbeddingEngine | None:
        engine = self.get(model)
        return engine if isinstance(engine, EmbeddingEngine) else None

    def models_status(self) -> list[ModelStatus]:
        """Every model as the device's pool has it (the admin API's view)."""
        return self.pool.status()

    def placement(self) -> Placement:
        return self.pool.placement()

    def stats(self) -> dict[str, EngineStats]:
        return {name: engine.stats() for name, engine in self._engines.items()}

    def restarts(self) -> dict[str, int]:
        """Restarts after a crash, per model, since the process started."""
        return {name: engine.stats().restarts for name, engine in self._engines.items()}

    @property
    def ready(self) -> bool:
        """Every model either takes requests or waits to be brought in on demand."""
        return all(s.ready or s.state in _ON_DEMAND for s in self.stats().values())


def _same_engine(a: ModelSpec, b: ModelSpec) -> bool:
    """Whether two entries run the same engine: they differ in pool settings or adapters
    at most (an engine with LoRA on takes new adapters as they come)."""
    from serving.vllm_engine import lora_enabled

    return (a.source, a.resolved_source, a.kind, a.engine, lora_enabled(a)) == (
        b.source,
        b.resolved_source,
        b.kind,
        b.engine,
        lora_enabled(b),
    )


#: States of a model that a request brings in (not a failure).
_ON_DEMAND = frozenset({EngineState.COLD, EngineState.SLEEPING, EngineState.WAKING})
