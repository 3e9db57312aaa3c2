"""The models of one device: which are resident, which wait cold, and switching between them.

Every model has a state and a memory footprint on the device: weights plus its KV budget,
declared in the catalog (``memory_gb``, or estimated from the weights' files and
``kv_cache_gb``) until the model has started, then measured (the engine's processes'
proportional memory on a CPU; the device memory its start took on a GPU). The pool keeps the
footprints of resident models within the device's budget.

A request for a model that is not resident makes the pool bring it in: it makes room by
taking out the least recently used resident models that are not pinned and have nothing in
flight (requests waiting for them included), then starts the model, or wakes it where it
sleeps. Taking out means vLLM's sleep mode where the platform has it (level 1: the weights go
to host memory and the KV cache is dropped; waking is far cheaper than a start), and
stopping the engine where it does not (vLLM on CPU refuses sleep mode). One switch runs at a
time per device. Callers wait for it at most ``cold_start_timeout_s``, then get
`EngineNotReady` with an estimate of when to retry; the switch itself goes on, so the next
request finds the model resident.

A model idle (nothing in flight, no request) for longer than its idle timeout is taken out
on its own, pinned models excepted.

States (`serving.engine.EngineState`)::

    cold ──request──► starting ──► ready ──evicted / idle──► stopping ──► cold
                          │          │ ▲
                          ▼          │ └──── waking ◄──request── sleeping  (GPUs)
                        failed       └──evicted / idle (GPUs)──────┘
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import msgspec

from serving.engine import EngineNotReady, EngineState, ModelEngine
from serving.progress import Progress

__all__ = [
    "ModelPool",
    "ModelStatus",
    "PlacedModel",
    "Placement",
    "device_memory_gb",
    "estimate_footprint_gb",
]

logger = logging.getLogger(__name__)
_GIB = 1 << 30
#: Demand is reported over this window (requests and tokens per minute).
_DEMAND_WINDOW_S = 60.0
#: How often idle models are looked for.
_IDLE_POLL_S = 1.0
#: After a failed start, how long requests fail at once before the next attempt.
_RETRY_FAILED_S = 30.0


class ModelStatus(msgspec.Struct):
    """One model as the pool sees it (the admin API's view)."""

    name: str
    kind: str
    aliases: tuple[str, ...]
    state: EngineState
    #: Its footprint on the device and whether that is measured or declared/estimated.
    memory_gb: float
    memory_measured: bool
    pinned: bool
    idle_timeout_s: float | None
    inflight: int
    #: Seconds since it was last used (``None``: never).
    idle_s: float | None
    #: Requests and tokens (prompt plus output) over the last minute.
    requests_per_min: int
    tokens_per_min: int
    #: Times it was brought in on demand, and how long that took (the last one and all).
    cold_starts: int
    last_cold_start_ms: float | None
    cold_start_ms_total: float
    #: Times it was taken out to make room, and taken out for being idle.
    evictions: int
    idle_stops: int
    #: Taken out of the catalog: it finishes its requests, then stops.
    retiring: bool = False


def device_memory_gb() -> float:
    """The memory models may take on this device: a GPU's total, or the host's available."""
    gpu = _gpu_memory()
    if gpu is not None:
        return gpu[1] / _GIB
    import psutil

    return float(psutil.virtual_memory().available) / _GIB


def _gpu_memory() -> tuple[int, int] | None:
    """(free, total) bytes of the first visible NVIDIA GPU, read through NVML (which, unlike
    torch, does not open a device context in this process); ``None`` without one."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return None
    try:
        pynvml: Any = importlib.import_module("vllm.third_party.pynvml")
        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible))
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.free), int(info.total)
    except Exception:
        return None


def estimate_footprint_gb(source: str, kv_cache_gb: float | None) -> float:
    """Weights (the checkpoint's files) plus the KV budget, for a model never started."""
    path = Path(source)
    weights = 0
    if path.is_dir():
        for pattern in ("*.safetensors", "*.bin", "*.pt"):
            weights += sum(f.stat().st_size for f in path.glob(pattern))
    return weights / _GIB + (kv_cache_gb or 0.0)


class _Entry:
    """What the pool keeps per model."""

    def __init__(self, engine: ModelEngine, default_idle_s: float | None) -> None:
        spec = engine.spec
        self.engine = engine
        self.pinned = spec.pin
        self.idle_timeout_s = (
            spec.idle_timeout_s if spec.idle_timeout_s is not None else default_idle_s
        )
        self.declared = spec.memory_gb is not None
        #: Weights plus KV budget, before any start (the estimate's part we can compute).
        self.estimate_gb = estimate_footprint_gb(spec.resolved_source, spec.engine.kv_cache_gb)
        self.memory_gb = spec.memory_gb if spec.memory_gb is not None else self.estimate_gb
        self.measured = False
        self.inflight = 0
        self.last_used: float | None = None
        self.cold_starts = 0
        self.last_cold_start_ms: float | None = None
        self.cold_start_ms_total = 0.0
        self.evictions = 0
        self.idle_stops = 0
        #: (time, tokens) of recent requests.
        self.demand: deque[tuple[float, int]] = deque()
        self.switch: asyncio.Task[None] | None = None
        #: How long its last start (or wake) took, the estimate of the next one.
        self.switch_s: float | None = None
        #: When its last start failed: requests in the next seconds fail at once.
        self.failed_at: float | None = None
        #: Leaving the pool once its requests are done (retired, or replaced).
        self.retiring = False

    @property
    def state(self) -> EngineState:
        return self.engine.state

    @property
    def resident(self) -> bool:
        """Holding device memory: starting, ready, stopping (not cold, asleep or failed)."""
        return self.state in _HOLDING


class ModelPool:
    """The engines sharing one device, within its memory budget.

    Args:
        engines: Every model of the device; none is started yet.
        budget_gb: The device's memory for models; ``None`` measures it
            (`device_memory_gb`).
        cold_start_timeout_s: How long a request waits for its model to be brought in.
        idle_timeout_s: Models unused this long are taken out (unless pinned or their
            catalog entry says otherwise); ``None`` keeps them.
        sleep: Take models out by vLLM's sleep mode where the platform has it; ``None``
            decides by the platform.
        progress: Told ``(model, phase)`` as models start (``starting``, ``ready``,
            ``failed``) and when one is left out at start-up (``cold``).
    """

    def __init__(
        self,
        engines: list[ModelEngine],
        *,
        budget_gb: float | None = None,
        cold_start_timeout_s: float = 120.0,
        idle_timeout_s: float | None = None,
        sleep: bool | None = None,
        progress: Progress | None = None,
    ) -> None:
        self._progress = progress
        self._entries: dict[ModelEngine, _Entry] = {
            engine: _Entry(engine, idle_timeout_s) for engine in engines
        }
        self._default_idle_s = idle_timeout_s
        self._budget_gb = budget_gb
        self.cold_start_timeout_s = cold_start_timeout_s
        self._sleep = sleep
        #: What a started engine took beyond its weights and KV budget (the runtime's own
        #: memory), learnt from the first measured start; added to estimates.
        self._overhead_gb = 0.0
        self._lock = asyncio.Lock()
        self._released = asyncio.Event()
        self._idle_task: asyncio.Task[None] | None = None
        self._closed = False
        for entry in self._entries.values():
            entry.engine.pool = self

    @property
    def budget_gb(self) -> float:
        if self._budget_gb is None:
            self._budget_gb = device_memory_gb()
        return self._budget_gb

    @property
    def can_sleep(self) -> bool:
        if self._sleep is None:
            from vllm.platforms import current_platform

            self._sleep = bool(current_platform.is_sleep_mode_available())
        return self._sleep

    def used_gb(self) -> float:
        return sum(e.memory_gb for e in self._entries.values() if e.resident)

    def _footprint(self, entry: _Entry) -> float:
        if entry.measured or entry.declared:
            return entry.memory_gb
        return entry.estimate_gb + self._overhead_gb

    # Start-up and shutdown

    async def start(self) -> None:
        """Start what fits, pinned models first, then in catalog order; the rest stay cold.

        Raises:
            EngineNotReady: a pinned model does not fit the device.
            Exception: whatever a model's first start raised.
        """
        order = sorted(self._entries.values(), key=lambda e: not e.pinned)
        if _free_device_bytes() is None:
            await self._start_together(order)
        else:
            # A GPU: one start at a time, each measured by the device memory it took (and
            # vLLM profiles the free memory at start, which another start would skew).
            for entry in order:
                await self._start_together([entry])
        self._idle_task = asyncio.get_running_loop().create_task(
            self._idle_watch(), name="pool-idle"
        )

    def _fits_at_start(self, entry: _Entry, used_gb: float) -> bool:
        """Whether ``entry`` starts at boot beside ``used_gb`` (its footprint is set if so).

        Raises:
            EngineNotReady: ``entry`` is pinned and does not fit.
        """
        need = self._footprint(entry)
        if used_gb + need > self.budget_gb:
            if entry.pinned:
                raise EngineNotReady(
                    f"pinned models do not fit the device: {entry.engine.name} needs "
                    f"{need:.2f} GiB, {self.budget_gb - used_gb:.2f} GiB are left"
                )
            logger.info("model %s stays cold: the device is full", entry.engine.name)
            if self._progress is not None:
                self._progress(entry.engine.name, "cold")
            return False
        entry.memory_gb = need
        return True

    async def _start_together(self, order: list[_Entry]) -> None:
        """Start what fits side by side (engines that measure themselves, as on a CPU):
        start-up is mostly one core's imports per engine. Models that measure more than
        they were expected to are taken out again, the last in ``order`` first.

        Raises:
            Exception: what the first of them to fail raised, once all have ended.
        """
        chosen: list[_Entry] = []
        for entry in order:
            if self._fits_at_start(entry, sum(e.memory_gb for e in chosen) + self.used_gb()):
                chosen.append(entry)
        outcomes = await asyncio.gather(
            *(self._launch(entry) for entry in chosen), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        for entry in reversed(chosen):
            if self.used_gb() > self.budget_gb and not entry.pinned:
                logger.info("model %s took more than expected: taking it out", entry.engine.name)
                await self._take_out(entry)

    async def shutdown(self) -> None:
        self._closed = True
        if self._idle_task is not None:
            self._idle_task.cancel()
            await asyncio.gather(self._idle_task, return_exceptions=True)
        switches = [e.switch for e in self._entries.values() if e.switch is not None]
        for task in switches:
            task.cancel()
        await asyncio.gather(*switches, return_exceptions=True)
        await asyncio.gather(
            *(e.engine.shutdown() for e in self._entries.values()), return_exceptions=True
        )

    # Live changes of the catalog

    def add(self, engine: ModelEngine) -> None:
        """A model that joins the device, cold (it starts when a request needs it)."""
        self._entries[engine] = _Entry(engine, self._default_idle_s)
        engine.pool = self

    def reconfigure(self, engine: ModelEngine) -> None:
        """Its entry's pool settings (pin, idle timeout, declared footprint) changed."""
        entry = self._entries[engine]
        spec = engine.spec
        entry.pinned = spec.pin
        entry.idle_timeout_s = (
            spec.idle_timeout_s if spec.idle_timeout_s is not None else self._default_idle_s
        )
        entry.declared = spec.memory_gb is not None
        if spec.memory_gb is not None and not entry.measured:
            entry.memory_gb = spec.memory_gb

    async def retire(self, engine: ModelEngine) -> None:
        """Let ``engine`` finish what it serves (requests waiting for it included), then stop
        it and forget it."""
        entry = self._entries.get(engine)
        if entry is None:
            return
        entry.retiring = True
        while entry.inflight or entry.switch is not None:
            if entry.switch is not None:
                await asyncio.gather(entry.switch, return_exceptions=True)
                continue
            self._released.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._released.wait()
        async with self._lock:
            await engine.shutdown()
        self._entries.pop(engine, None)
        self._released.set()  # its memory is free: a switch waiting for room may go on

    # The request path

    def enter(self, engine: ModelEngine) -> None:
        """A request for ``engine`` begins (it counts as in flight from now on)."""
        entry = self._entries[engine]
        entry.inflight += 1
        entry.last_used = time.monotonic()

    def leave(self, engine: ModelEngine, tokens: int) -> None:
        """A request for ``engine`` ended, having cost ``tokens`` (prompt plus output)."""
        entry = self._entries[engine]
        entry.inflight -= 1
        now = entry.last_used = time.monotonic()
        entry.demand.append((now, tokens))
        if entry.inflight == 0:
            self._released.set()

    async def bring_in(self, engine: ModelEngine) -> float:
        """Make ``engine`` resident and ready; the milliseconds waited (0 when it was).

        A model whose supervisor is restarting it after a crash is left to the supervisor
        (the engine waits for that itself).

        Raises:
            EngineNotReady: not in time (``cold_start_timeout_s``), the device cannot make
                room for it, or its start failed.
        """
        entry = self._entries[engine]
        if entry.switch is None and (entry.state is EngineState.READY or engine.supervised):
            return 0.0
        began = time.monotonic()
        if entry.switch is None and entry.failed_at is not None:
            wait = entry.failed_at + _RETRY_FAILED_S - began
            if wait > 0:
                raise EngineNotReady(
                    f"The model `{engine.name}` failed to start; please retry later.",
                    retry_after_s=wait,
                )
        if entry.switch is None:
            entry.switch = task = asyncio.get_running_loop().create_task(
                self._bring_in(entry), name=f"pool-bring-in-{engine.name}"
            )

            def done(finished: asyncio.Task[None]) -> None:
                entry.switch = None
                if not finished.cancelled() and (error := finished.exception()) is not None:
                    logger.error("model %s could not be brought in: %s", engine.name, error)

            task.add_done_callback(done)
        task = entry.switch
        try:
            async with asyncio.timeout(self.cold_start_timeout_s):
                await asyncio.shield(task)
        except TimeoutError:
            raise EngineNotReady(
                f"The model `{engine.name}` is being loaded; please retry shortly.",
                retry_after_s=self._eta_s(entry, began),
            ) from None
        except EngineNotReady:
            raise
        except Exception as exc:
            raise EngineNotReady(
                f"The model `{engine.name}` could not be started; please retry later.",
                retry_after_s=30.0,
            ) from exc
        return (time.monotonic() - began) * 1000

    def _eta_s(self, entry: _Entry, began: float) -> float:
        expected = entry.switch_s if entry.switch_s is not None else 30.0
        return max(expected - (time.monotonic() - began), 1.0)

    async def _bring_in(self, entry: _Entry) -> None:
        async with self._lock:
            if entry.state is EngineState.READY:
                return
            need = self._footprint(entry)
            await self._make_room(entry, need, check=True)
            entry.memory_gb = need
            began = time.monotonic()
            if entry.state is EngineState.SLEEPING:
                await self._wake(entry)
            else:
                await self._launch(entry)
            spent = (time.monotonic() - began) * 1000
            entry.cold_starts += 1
            entry.last_cold_start_ms = spent
            entry.cold_start_ms_total += spent
            # Now measured: the estimate it came in on may have been short.
            await self._make_room(entry, 0.0, check=False)

    async def _make_room(self, entry: _Entry, need: float, *, check: bool) -> None:
        """Take out least recently used models until ``need`` more GiB fit.

        Raises:
            EngineNotReady: ``entry`` cannot fit even with every other model out (checked
                with ``check``), or room did not come free within the cold-start timeout
                (what is left is in flight or pinned).
        """
        others = [e for e in self._entries.values() if e is not entry]
        pinned = sum(e.memory_gb for e in others if e.resident and e.pinned)
        if check and pinned + need > self.budget_gb:
            raise EngineNotReady(
                f"The model `{entry.engine.name}` ({need:.2f} GiB) does not fit this device "
                f"({self.budget_gb:.2f} GiB, {pinned:.2f} GiB pinned)."
            )
        deadline = time.monotonic() + self.cold_start_timeout_s
        while self.used_gb() + need > self.budget_gb + 1e-9:
            victims = [e for e in others if e.resident and not e.pinned and e.inflight == 0]
            victims = [e for e in victims if e.state is EngineState.READY and not e.retiring]
            if victims:
                victim = min(victims, key=lambda e: e.last_used or 0.0)
                victim.evictions += 1
                logger.info(
                    "taking %s out to make room for %s", victim.engine.name, entry.engine.name
                )
                await self._take_out(victim)
                continue
            left = deadline - time.monotonic()
            if left <= 0 or not check:
                if not check:
                    logger.warning("the device is over its budget: every other model is busy")
                    return
                raise EngineNotReady(
                    f"The model `{entry.engine.name}` waits for room on the device; every "
                    "other model is busy. Please retry shortly.",
                    retry_after_s=5.0,
                )
            self._released.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 1.0)):
                    await self._released.wait()

    async def _launch(self, entry: _Entry) -> None:
        began = time.monotonic()
        before = _free_device_bytes()
        name = entry.engine.name
        if self._progress is not None:
            self._progress(name, "starting")
        try:
            await entry.engine.start()
        except BaseException:
            entry.failed_at = time.monotonic()
            if self._progress is not None:
                self._progress(name, "failed")
            raise
        entry.failed_at = None
        if self._progress is not None:
            self._progress(name, "ready")
        entry.switch_s = time.monotonic() - began
        if entry.last_used is None:  # started at boot: as if used now, for LRU and idleness
            entry.last_used = time.monotonic()
        measured = entry.engine.memory_bytes()
        if measured is None and before is not None and (after := _free_device_bytes()):
            measured = max(before - after, 0)
        if measured:
            entry.memory_gb = measured / _GIB
            entry.measured = True
            if not entry.declared:
                self._overhead_gb = max(self._overhead_gb, entry.memory_gb - entry.estimate_gb)

    async def _wake(self, entry: _Entry) -> None:
        began = time.monotonic()
        await entry.engine.wake()
        entry.switch_s = time.monotonic() - began

    async def _take_out(self, entry: _Entry) -> None:
        if self.can_sleep and entry.engine.can_sleep:
            try:
                await entry.engine.sleep()
            except Exception:
                logger.warning("model %s did not sleep; stopping it", entry.engine.name)
            else:
                return
        await entry.engine.shutdown()

    async def _idle_watch(self) -> None:
        while not self._closed:
            await asyncio.sleep(_IDLE_POLL_S)
            now = time.monotonic()
            for entry in list(self._entries.values()):
                timeout = entry.idle_timeout_s
                if (
                    timeout is None
                    or entry.retiring
                    or entry.pinned
                    or entry.inflight
                    or entry.switch is not None
                    or entry.state is not EngineState.READY
                    or now - (entry.last_used or now) < timeout
                ):
                    continue
                async with self._lock:
                    if entry.inflight or entry.state is not EngineState.READY:
                        continue
                    logger.info(
                        "model %s idle for %.0f s: taking it out", entry.engine.name, timeout
                    )
                    entry.idle_stops += 1
                    await self._take_out(entry)

    # What it looks like

    def status(self) -> list[ModelStatus]:
        now = time.monotonic()
        rows = []
        for entry in self._entries.values():
            name = entry.engine.name
            while entry.demand and entry.demand[0][0] < now - _DEMAND_WINDOW_S:
                entry.demand.popleft()
            rows.append(
                ModelStatus(
                    name=name,
                    kind=entry.engine.spec.kind,
                    aliases=entry.engine.spec.aliases,
                    state=entry.state,
                    memory_gb=round(entry.memory_gb, 3),
                    memory_measured=entry.measured,
                    pinned=entry.pinned,
                    idle_timeout_s=entry.idle_timeout_s,
                    inflight=entry.inflight,
                    idle_s=None if entry.last_used is None else round(now - entry.last_used, 1),
                    requests_per_min=len(entry.demand),
                    tokens_per_min=sum(tokens for _, tokens in entry.demand),
                    cold_starts=entry.cold_starts,
                    last_cold_start_ms=entry.last_cold_start_ms,
                    cold_start_ms_total=round(entry.cold_start_ms_total, 1),
                    evictions=entry.evictions,
                    idle_stops=entry.idle_stops,
                    retiring=entry.retiring,
                )
            )
        return rows

    def placement(self) -> Placement:
        models = self.status()
        budget = self.budget_gb
        return Placement(
            budget_gb=round(budget, 3),
            used_gb=round(self.used_gb(), 3),
            sleep_mode=self.can_sleep,
            resident=[m.name for m in models if m.state in _HOLDING],
            models=[
                PlacedModel(
                    name=m.name,
                    state=m.state,
                    memory_gb=m.memory_gb,
                    share=round(m.memory_gb / budget, 4) if m.state in _HOLDING else 0.0,
                    requests_per_min=m.requests_per_min,
                    tokens_per_min=m.tokens_per_min,
                    cold_starts=m.cold_starts,
                    last_cold_start_ms=m.last_cold_start_ms,
                )
                for m in models
            ],
        )


_HOLDING = frozenset(
    {EngineState.STARTING, EngineState.READY, EngineState.WAKING, EngineState.STOPPING}
)


class PlacedModel(msgspec.Struct):
    name: str
    state: EngineState
    memory_gb: float
    #: Its share of the device's budget (0 when it holds none).
    share: float
    requests_per_min: int
    tokens_per_min: int
    cold_starts: int
    last_cold_start_ms: float | None


class Placement(msgspec.Struct):
    """Which models hold the device's memory, and how much of it."""

    budget_gb: float
    used_gb: float
    #: Models leave by vLLM's sleep mode (GPUs) rather than by stopping.
    sleep_mode: bool
    resident: list[str]
    models: list[PlacedModel]


def _free_device_bytes() -> int | None:
    """Free memory of the GPU; ``None`` on a CPU."""
    gpu = _gpu_memory()
    return gpu[0] if gpu is not None else None
