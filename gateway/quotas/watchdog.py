"""Is the quota store answering? Asked from a thread of its own, so the answer is not skewed
by how busy the event loop is.

A deadline on each store call cannot tell a hung store from a busy gateway: under a burst the
replies sit behind other work on the event loop, the deadline fires, and healthy traffic is
refused. The watchdog pings the store on its own connection every ``interval_s``; once a ping
fails or takes longer than ``timeout_s``, the store is down, and every call waiting on it (and
every new one) gives up at once. Calls made while the store is up wait as long as they need,
up to a hard cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from gateway.quotas.store import StoreUnavailable

__all__ = ["NotSent", "StoreWatchdog", "guarded"]

T = TypeVar("T")


class NotSent(StoreUnavailable):
    """The store was known to be down, so the call was never made."""


logger = logging.getLogger(__name__)


class StoreWatchdog:
    """Pings the store from a thread; tells the event loop when it goes down or comes back."""

    def __init__(
        self, ping: Callable[[], object], *, interval_s: float = 0.05, name: str = "store"
    ) -> None:
        self._ping = ping
        self._interval_s = interval_s
        self._name = name
        self._up = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._down: asyncio.Future[None] | None = None

    @classmethod
    def for_redis(cls, url: str, *, timeout_s: float) -> StoreWatchdog:
        """A watchdog on its own synchronous connection to the Redis at ``url``."""
        import redis

        client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=None
        )
        return cls(client.ping, name="redis")

    @property
    def up(self) -> bool:
        return self._up

    def start(self) -> None:
        """Start watching; call from the event loop that will wait on ``down``."""
        self._loop = asyncio.get_running_loop()
        self._down = self._loop.create_future()
        self._thread = threading.Thread(target=self._run, name=f"{self._name}-watchdog")
        self._thread.daemon = True
        self._thread.start()

    def down(self) -> asyncio.Future[None]:
        """A future that completes when the store is found down (already done if it is)."""
        if self._down is None:
            self._down = asyncio.get_running_loop().create_future()
        return self._down

    def _run(self) -> None:
        # Off the event loop's core, if it has one: a busy loop must not look like a dead store.
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        while not self._stop.is_set():
            try:
                self._ping()
            except Exception:
                self._set(False)
            else:
                self._set(True)
            self._stop.wait(self._interval_s)

    def _set(self, up: bool) -> None:
        if up == self._up:
            return
        self._up = up
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                self._loop.call_soon_threadsafe(self._flip, up)

    def _flip(self, up: bool) -> None:
        if up:
            logger.info("%s answers again", self._name)
            if self._down is not None and self._down.done():
                self._down = asyncio.get_running_loop().create_future()
        else:
            logger.warning("%s does not answer", self._name)
            if self._down is not None and not self._down.done():
                self._down.set_result(None)

    def stop(self, timeout_s: float = 1.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)


async def guarded(
    call: Coroutine[Any, Any, T], watchdog: StoreWatchdog | None, hard_timeout_s: float
) -> T:
    """Await a store call until it answers, the watchdog finds the store down, or
    ``hard_timeout_s`` passes.

    No short deadline per call: under a burst, replies wait behind other work on the event
    loop, and such a deadline would refuse healthy traffic. Whether the store answers is the
    watchdog's to say, from a thread of its own. The call runs in the caller's task (no task
    of its own on the hot path); the watchdog's verdict cancels it there.

    Raises:
        NotSent: the store was already known to be down; the call was not made.
        TimeoutError: the store went down while the call waited, or it took too long; the
            call may or may not have taken effect.
    """
    if watchdog is not None and not watchdog.up:
        call.close()
        raise NotSent("the store does not answer")
    if watchdog is None:
        async with asyncio.timeout(hard_timeout_s):
            return await call
    task = asyncio.current_task()
    assert task is not None  # a coroutine awaited on an event loop runs in a task
    state = {"finished": False, "gave_up": False}

    def give_up(_: asyncio.Future[None]) -> None:
        # Scheduled when the store is found down; too late once the call is over.
        if not state["finished"]:
            state["gave_up"] = True
            task.cancel()

    down = watchdog.down()
    down.add_done_callback(give_up)
    try:
        async with asyncio.timeout(hard_timeout_s):
            return await call
    except asyncio.CancelledError:
        if state["gave_up"] and task.uncancel() == 0:  # our cancellation, nobody else's
            raise TimeoutError("the store went down while the call waited") from None
        raise
    finally:
        state["finished"] = True
        down.remove_done_callback(give_up)
