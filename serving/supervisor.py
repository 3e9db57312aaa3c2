"""Keeps one engine running: starts it, watches it, and restarts it after a crash.

An engine's processes can die under it (a kernel's out-of-memory killer, a bug in a kernel, a
signal). The supervisor notices within ``poll_s`` (or at once when a request saw the engine
die), marks the engine ``failed``, cleans up what is left of it and starts it again in the
same process, after a backoff that doubles from ``backoff_s`` up to ``max_backoff_s`` while
starts keep failing. Requests that arrive meanwhile wait for it a bounded time
(`Supervisor.wait_ready`) and then get `EngineNotReady` with an estimate of when to retry.

States (`serving.engine.EngineState`)::

    cold ──start──► starting ──ok──► ready ──dies──► failed ──backoff──► starting
                           │                                                  │
                           └──fails (first start): raised to the caller       └──fails: failed
    any ──shutdown──► stopping ──► cold   (and ``start`` again: a model pool's switch)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from serving.engine import EngineNotReady, EngineState

__all__ = ["Supervisor"]

logger = logging.getLogger(__name__)


class Supervisor:
    """The life of one engine.

    Args:
        name: The model's name, for messages.
        launch: Starts the engine's processes; returns when it takes requests.
        stop: Stops them, or cleans up after processes that died; never raises.
        dead: Whether the running engine has died.
        on_ready: Called after every successful start (the first one included).
        backoff_s: The pause before the first restart attempt.
        max_backoff_s: The longest pause between attempts.
        poll_s: How often a running engine is checked.
    """

    def __init__(
        self,
        name: str,
        *,
        launch: Callable[[], Awaitable[None]],
        stop: Callable[[], Awaitable[None]],
        dead: Callable[[], bool],
        on_ready: Callable[[], None] | None = None,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        poll_s: float = 0.25,
    ) -> None:
        self.name = name
        self._launch = launch
        self._stop = stop
        self._dead = dead
        self._on_ready = on_ready
        self._backoff_s = backoff_s
        self._max_backoff_s = max(max_backoff_s, backoff_s)
        self._poll_s = poll_s
        self.state = EngineState.COLD
        self.restarts = 0
        self.last_error: str | None = None
        #: How long the last successful start took (the estimate of the next one).
        self.start_s: float | None = None
        self._since = time.monotonic()
        self._ready = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._seen_error: str | None = None

    async def start(self) -> None:
        """Start the engine for the first time and watch it from then on.

        Raises:
            Exception: whatever the first start raised (nothing is watched then).
        """
        self._set(EngineState.STARTING)
        began = time.monotonic()
        try:
            await self._launch()
        except BaseException as exc:
            self.last_error = _describe(exc)
            self._set(EngineState.FAILED)
            await self._stop()
            raise
        self.start_s = time.monotonic() - began
        self._set(EngineState.READY)
        if self._on_ready is not None:
            self._on_ready()
        self._watcher = asyncio.get_running_loop().create_task(
            self._watch(), name=f"supervise-{self.name}"
        )

    @property
    def watching(self) -> bool:
        """Whether it watches a started engine (and restarts it should it die)."""
        return self._watcher is not None and not self._watcher.done()

    def notice_failure(self) -> None:
        """A request saw the engine die: check now instead of at the next poll."""
        self._wakeup.set()

    def check(self) -> None:
        """Raise unless the engine takes requests now.

        Raises:
            EngineNotReady: it is starting, restarting or stopped.
        """
        if self.state is not EngineState.READY:
            raise self._not_ready()

    async def wait_ready(self, timeout_s: float) -> None:
        """Return once the engine takes requests, waiting at most ``timeout_s``.

        Raises:
            EngineNotReady: it did not get there in time, or it is stopping.
        """
        if self.state is EngineState.READY:
            return
        if self.state in (EngineState.STOPPING, EngineState.COLD) or timeout_s <= 0:
            raise self._not_ready()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._ready.wait()
        if not self._ready.is_set():
            raise self._not_ready()

    def retry_after_s(self) -> float:
        """A guess of how long until the engine is ready again, at least a second."""
        expected = self.start_s if self.start_s is not None else 30.0
        if self.state is EngineState.FAILED:
            expected += self._backoff_s
        elapsed = time.monotonic() - self._since
        return max(expected - elapsed, 1.0)

    async def shutdown(self) -> None:
        """Stop watching and stop the engine."""
        self._set(EngineState.STOPPING)
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        await self._stop()
        self._set(EngineState.COLD)

    def _not_ready(self) -> EngineNotReady:
        what = {
            EngineState.STARTING: "is starting" if self.restarts == 0 else "is restarting",
            EngineState.FAILED: "failed and is being restarted",
            EngineState.STOPPING: "is shutting down",
            EngineState.COLD: "is not loaded",
        }.get(self.state, "is not ready")
        return EngineNotReady(
            f"The model `{self.name}` {what}; please retry shortly.",
            retry_after_s=self.retry_after_s(),
        )

    def _set(self, state: EngineState) -> None:
        self.state = state
        self._since = time.monotonic()
        if state is EngineState.READY:
            self._ready.set()
        else:
            self._ready.clear()

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_s):
                    await self._wakeup.wait()
            self._wakeup.clear()
            if self.state is EngineState.READY and self._dead():
                await self._restart()

    async def _restart(self) -> None:
        self.last_error = self._seen_error or "the engine process exited"
        self._seen_error = None
        logger.error("engine %s died (%s); restarting it", self.name, self.last_error)
        self._set(EngineState.FAILED)
        await self._stop()
        delay = self._backoff_s
        while True:
            await asyncio.sleep(delay)
            self._set(EngineState.STARTING)
            began = time.monotonic()
            try:
                await self._launch()
            except Exception as exc:
                self.last_error = _describe(exc)
                logger.error(
                    "engine %s did not restart (%s); next attempt in %.0f s",
                    self.name,
                    self.last_error,
                    min(delay * 2, self._max_backoff_s),
                )
                self._set(EngineState.FAILED)
                await self._stop()
                delay = min(delay * 2, self._max_backoff_s)
                continue
            self.start_s = time.monotonic() - began
            self.restarts += 1
            self._set(EngineState.READY)
            logger.warning(
                "engine %s is back after restart %d (%.1f s)",
                self.name,
                self.restarts,
                self.start_s,
            )
            if self._on_ready is not None:
                self._on_ready()
            return

    def mark_error(self, error: BaseException) -> None:
        """Remember why the engine died, as a request saw it, and check it now."""
        self._seen_error = _describe(error)
        self._wakeup.set()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
