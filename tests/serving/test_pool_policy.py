"""The pool's decisions where real engines are too slow to show them: a cold start that
outlasts the caller's wait, pinned models, a start that fails.

The engines here are stand-ins that take a set time to start (the pool's decisions are
what is under test; tests/gateway/test_pool.py runs the pool on real engines).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from serving.catalog import ModelSpec
from serving.engine import EngineNotReady, EngineState, EngineStats, ModelEngine
from serving.pool import ModelPool


class TimedEngine(ModelEngine):
    """Starts in ``start_s``; fails to start ``failures`` times first."""

    def __init__(self, name: str, start_s: float, *, pin: bool = False, failures: int = 0) -> None:
        self.spec = ModelSpec(name=name, source="/none", memory_gb=1.0, pin=pin)
        self.start_s = start_s
        self.failures = failures
        self._state = EngineState.COLD
        self.starts = 0

    async def start(self) -> None:
        self._state = EngineState.STARTING
        await asyncio.sleep(self.start_s)
        if self.failures:
            self.failures -= 1
            self._state = EngineState.FAILED
            raise RuntimeError("no room at the inn")
        self.starts += 1
        self._state = EngineState.READY

    async def shutdown(self) -> None:
        self._state = EngineState.COLD

    @property
    def state(self) -> EngineState:
        return self._state

    def stats(self) -> EngineStats:
        return EngineStats(state=self._state, ready=self._state is EngineState.READY)

    @property
    def max_model_len(self) -> int:
        return 16

    def tokenize(self, text: str) -> list[int]:
        return [1]

    def check_prompt(self, prompt: Sequence[int], max_tokens: int) -> None:
        pass


async def test_a_caller_waits_at_most_the_cold_start_timeout_and_the_start_goes_on() -> None:
    slow = TimedEngine("slow", start_s=0.5)
    pool = ModelPool([slow], budget_gb=1.0, cold_start_timeout_s=0.1, sleep=False)
    with pytest.raises(EngineNotReady) as refused:
        await pool.bring_in(slow)
    assert refused.value.retry_after_s is not None
    assert refused.value.retry_after_s >= 1.0
    await asyncio.sleep(0.6)
    assert slow.state is EngineState.READY
    assert await pool.bring_in(slow) == 0.0  # resident now: no wait
    assert slow.starts == 1
    await pool.shutdown()


async def test_pinned_models_stay_and_a_model_that_cannot_fit_is_refused_at_once() -> None:
    pinned = TimedEngine("pinned", 0.0, pin=True)
    other = TimedEngine("other", 0.0)
    pool = ModelPool([pinned, other], budget_gb=1.0, cold_start_timeout_s=5, sleep=False)
    await pool.start()
    assert pinned.state is EngineState.READY
    assert other.state is EngineState.COLD
    with pytest.raises(EngineNotReady, match="does not fit"):
        await pool.bring_in(other)
    assert pinned.state is EngineState.READY
    await pool.shutdown()


async def test_a_busy_model_is_waited_for_then_taken_out() -> None:
    first, second = TimedEngine("first", 0.0), TimedEngine("second", 0.0)
    pool = ModelPool([first, second], budget_gb=1.0, cold_start_timeout_s=5, sleep=False)
    await pool.start()
    pool.enter(first)  # a request in flight
    waiting = asyncio.create_task(pool.bring_in(second))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    assert first.state is EngineState.READY
    pool.leave(first, tokens=10)
    waited_ms = await asyncio.wait_for(waiting, 5)
    assert waited_ms >= 200
    assert (first.state, second.state) == (EngineState.COLD, EngineState.READY)
    await pool.shutdown()


async def test_after_a_failed_start_requests_fail_fast_for_a_while() -> None:
    broken = TimedEngine("broken", 0.0, failures=1)
    pool = ModelPool([broken], budget_gb=1.0, cold_start_timeout_s=5, sleep=False)
    with pytest.raises(EngineNotReady, match="could not be started"):
        await pool.bring_in(broken)
    with pytest.raises(EngineNotReady, match="failed to start") as again:
        await pool.bring_in(broken)
    assert again.value.retry_after_s is not None
    assert again.value.retry_after_s > 20
    assert broken.starts == 0
    await pool.shutdown()
