"""Every engine of one process: started together, looked up by model name, stopped together."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable

from serving.catalog import Catalog, ModelSpec
from serving.engine import EmbeddingEngine, EngineStats, GenerationEngine, ModelEngine
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
    """The co-located engines of one process, sharing its event loop.

    Args:
        catalog: The models to serve.
        ready_wait_s: How long a request waits for an engine that is restarting.
        progress: Told ``(model, phase)`` as each engine starts: ``starting``, ``ready``
            (or ``failed``).
    """

    def __init__(
        self,
        catalog: Catalog,
        *,
        ready_wait_s: float = 10.0,
        progress: Progress | None = None,
    ) -> None:
        # Weights come from disk, never from the network, unless the operator says otherwise.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from serving.vllm_engine import configure_cpu_binding

        self.catalog = catalog
        self.progress = progress
        # Nothing to split the cores for without engines (and no thread to pin).
        self._cpus = cpus = configure_cpu_binding() if catalog.models else None
        self._started = False
        self._engines: dict[str, ModelEngine] = {
            spec.name: make_engine(
                spec, cpus, ready_wait_s=ready_wait_s, on_ready=self._engine_ready
            )
            for spec in catalog
        }

    def _engine_ready(self) -> None:
        # After a restart: the new engine processes leave the event loop's core too. (The
        # first start pins them all at once, when every engine is up.)
        if self._started:
            from serving.vllm_engine import pin_engine_processes

            pin_engine_processes(self._cpus)

    async def start(self) -> None:
        """Start every engine side by side; if one fails, stop the others and raise."""
        started = time.perf_counter()
        results = await asyncio.gather(
            *(self._start_one(engine) for engine in self._engines.values()),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self.shutdown()
            raise failures[0]
        from serving.vllm_engine import pin_engine_processes

        pin_engine_processes(self._cpus)
        self._started = True
        settle_process()
        logger.info(
            "started %d engine(s) in %.1f s", len(self._engines), time.perf_counter() - started
        )

    async def _start_one(self, engine: ModelEngine) -> None:
        began = time.perf_counter()
        if self.progress is not None:
            self.progress(engine.name, "starting")
        try:
            await engine.start()
        except BaseException:
            if self.progress is not None:
                self.progress(engine.name, "failed")
            raise
        if self.progress is not None:
            self.progress(engine.name, "ready")
        logger.debug("engine %s ready in %.1f s", engine.name, time.perf_counter() - began)

    async def shutdown(self) -> None:
        await asyncio.gather(
            *(engine.shutdown() for engine in self._engines.values()), return_exceptions=True
        )

    def engines(self) -> list[ModelEngine]:
        """Every engine, in catalog order."""
        return list(self._engines.values())

    def get(self, model: str) -> ModelEngine | None:
        """The engine serving ``model`` (a name or an alias)."""
        spec = self.catalog.get(model)
        return self._engines[spec.name] if spec is not None else None

    def generation(self, model: str) -> GenerationEngine | None:
        engine = self.get(model)
        return engine if isinstance(engine, GenerationEngine) else None

    def embedding(self, model: str) -> EmbeddingEngine | None:
        engine = self.get(model)
        return engine if isinstance(engine, EmbeddingEngine) else None

    def stats(self) -> dict[str, EngineStats]:
        return {name: engine.stats() for name, engine in self._engines.items()}

    def restarts(self) -> dict[str, int]:
        """Restarts after a crash, per model, since the process started."""
        return {name: engine.stats().restarts for name, engine in self._engines.items()}

    @property
    def ready(self) -> bool:
        return all(s.ready for s in self.stats().values())
