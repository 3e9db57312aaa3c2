"""The admission queue in front of an engine: weighted fair sharing between groups.

An engine takes at most ``slots`` requests at once (its running batch); more wait here, and
each slot that frees goes to the next request in this order:

1. Class: every waiting ``interactive`` request before any ``batch`` one.
2. Within a class, the group with the smallest virtual token counter (VTC; Sheng et al.,
   "Fairness in Serving Large Language Models", OSDI 2024). A group's counter grows by the
   tokens it is served, divided by its weight: ``INPUT_WEIGHT`` per prompt token when its
   request is let in, ``OUTPUT_WEIGHT`` per output token as the engine makes it. So two
   groups that keep the engine busy are served tokens in the ratio of their weights,
   whatever their request sizes.
3. Within a group, first come, first served.

A group that had nothing waiting starts from the smallest counter of the groups waiting (or
of the last one let in), so that idling never banks credit. The queue is work-conserving: a
request for a free slot with nobody waiting goes in at once. A request that would make more
than ``max_queued`` wait is refused with `QueueFull`. ``slots`` and ``max_queued`` change
live; a larger ``slots`` lets waiting requests in at once.

Counters order the queue, but a slot frees only when a request ends: behind a flood of long
requests, a light group's short ones would wait for them. So a few ``reserve`` slots above
``slots`` go, at once, to a request whose group runs fewer requests than its share of the
slots (``slots`` times its weight over the weights of the groups running or waiting): a
group under its share never waits for one over it, and a flood alone never uses them.

The groups, their weights and the classes are opaque here: the caller (the gateway) maps
its tenants to them.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from serving.engine import EngineNotReady

__all__ = [
    "CLASSES",
    "INPUT_WEIGHT",
    "OUTPUT_WEIGHT",
    "WAIT_BUCKETS_S",
    "FairQueue",
    "Priority",
    "QueueFull",
    "RequestContext",
]

Priority = Literal["interactive", "batch"]
#: The classes, first served first.
CLASSES: tuple[Priority, ...] = ("interactive", "batch")
#: What a prompt token and an output token add to a group's counter (times 1 / weight).
INPUT_WEIGHT = 1.0
OUTPUT_WEIGHT = 2.0
#: Upper bounds of the queue-wait histogram's buckets, in seconds.
WAIT_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RequestContext(msgspec.Struct, frozen=True):
    """What an engine request carries besides its prompt and sampling: plain values, so that
    it can cross a process boundary.

    Args:
        group: Its fairness group (``""``: the common group).
        weight: The group's share of the engine against other groups (> 0).
        priority: ``interactive`` requests go before ``batch`` ones.
        cache_salt: Keeps its prompt's prefix-cache blocks apart from other salts' (vLLM's
            ``cache_salt``); ``None`` shares them.
    """

    group: str = ""
    weight: float = 1.0
    priority: Priority = "interactive"
    cache_salt: str | None = None


class QueueFull(EngineNotReady):
    """Too many requests wait for this engine; retry after ``retry_after_s``."""


@dataclass(eq=False)
class _Waiter:
    context: RequestContext
    prompt_tokens: int
    future: asyncio.Future[None]
    since: float = field(default_factory=time.monotonic)


class FairQueue:
    """The queue of one engine.

    Args:
        slots: Requests the engine runs at once.
        max_queued: Requests that may wait at once.
    """

    def __init__(self, slots: int, max_queued: int, reserve: int | None = None) -> None:
        self._slots = max(slots, 1)
        self.max_queued = max(max_queued, 0)
        #: The bounds it was made with, which a policy that sets none goes back to.
        self.default_slots, self.default_max_queued = self._slots, self.max_queued
        #: Slots above ``slots`` for groups under their share (default a quarter, at least 2).
        self.reserve = max(2, self._slots // 4) if reserve is None else max(reserve, 0)
        self.running = 0
        self._running: collections.Counter[str] = collections.Counter()
        self._weights: dict[str, float] = {}
        self.counters: dict[str, float] = {}
        self._waiting: dict[Priority, dict[str, collections.deque[_Waiter]]] = {
            c: {} for c in CLASSES
        }
        self._queued = 0
        self._floor = 0.0
        #: Tokens each group was served (prompt tokens let in, output tokens made).
        self.served: collections.Counter[str] = collections.Counter()
        #: Requests let in per class, and the seconds they waited in all and per bucket
        #: (``WAIT_BUCKETS_S``, cumulative counts as Prometheus keeps them).
        self.waits: dict[Priority, list[float]] = {
            c: [0.0] * (len(WAIT_BUCKETS_S) + 2) for c in CLASSES
        }

    @property
    def slots(self) -> int:
        return self._slots

    @slots.setter
    def slots(self, value: int) -> None:
        self._slots = max(value, 1)
        self.reserve = max(2, self._slots // 4)
        self._dispatch()

    @property
    def queued(self) -> int:
        """Requests waiting now."""
        return self._queued

    def waiting_by_class(self) -> dict[Priority, int]:
        """Requests waiting now per class."""
        return {c: sum(len(w) for w in self._waiting[c].values()) for c in CLASSES}

    def depth(self) -> dict[str, int]:
        """Requests waiting now per group."""
        depths: collections.Counter[str] = collections.Counter()
        for groups in self._waiting.values():
            for group, waiters in groups.items():
                depths[group] += len(waiters)
        return dict(depths)

    async def acquire(self, context: RequestContext, prompt_tokens: int) -> float:
        """Wait for a slot; returns the seconds waited. Call `release` when done with it.

        Raises:
            QueueFull: ``max_queued`` requests wait already.
            asyncio.CancelledError: cancelled while waiting (nothing held).
        """
        self._weights[context.group] = context.weight
        if (self.running < self._slots and self._queued == 0) or (
            self.running < self._slots + self.reserve and self._under_share(context.group)
        ):
            self._admit(context, prompt_tokens)
            self._waited(context.priority, 0.0)
            return 0.0
        if self._queued >= self.max_queued:
            raise QueueFull(
                f"{self._queued} requests are waiting for this model; retry later.",
                retry_after_s=1.0,
            )
        loop = asyncio.get_running_loop()
        waiter = _Waiter(context, prompt_tokens, loop.create_future())
        groups = self._waiting[context.priority]
        if context.group not in groups or not groups[context.group]:
            self._lift(context.group)
        groups.setdefault(context.group, collections.deque()).append(waiter)
        self._queued += 1
        self._dispatch()
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(context)  # let in just as it was cancelled: hand the slot on
            else:
                self._remove(waiter)
            raise
        waited = time.monotonic() - waiter.since
        self._waited(context.priority, waited)
        return waited

    def _waited(self, priority: Priority, seconds: float) -> None:
        """Count one wait: [count, sum, bucket counts..., +Inf]."""
        row = self.waits[priority]
        row[0] += 1
        row[1] += seconds
        for i, bound in enumerate(WAIT_BUCKETS_S):
            if seconds <= bound:
                row[2 + i] += 1

    def release(self, context: RequestContext) -> None:
        """A request of ``context`` let in has ended."""
        self.running -= 1
        self._running[context.group] -= 1
        if self._running[context.group] <= 0:
            del self._running[context.group]
        self._dispatch()

    def _under_share(self, group: str) -> bool:
        """Whether ``group`` runs fewer requests than its weighted share of the slots."""
        active = set(self._running) | {
            g for groups in self._waiting.values() for g, waiters in groups.items() if waiters
        }
        active.add(group)
        total = sum(self._weights.get(g, 1.0) for g in active)
        share = self._slots * self._weights.get(group, 1.0) / total
        return self._running[group] + 1 <= share

    def charge(self, context: RequestContext, output_tokens: int) -> None:
        """``output_tokens`` more were made for a request of ``context``."""
        if output_tokens > 0:
            self.counters[context.group] = self.counters.get(context.group, self._floor) + (
                OUTPUT_WEIGHT * output_tokens / context.weight
            )
            self.served[context.group] += output_tokens

    def _lift(self, group: str) -> None:
        """A group starts waiting: no lower than the smallest waiting counter."""
        backlogged = [
            self.counters.get(g, self._floor)
            for groups in self._waiting.values()
            for g, waiters in groups.items()
            if waiters
        ]
        floor = min(backlogged) if backlogged else self._floor
        self.counters[group] = max(self.counters.get(group, floor), floor)

    def _admit(self, context: RequestContext, prompt_tokens: int) -> None:
        self.running += 1
        self._running[context.group] += 1
        counter = self.counters.get(context.group, self._floor)
        self.counters[context.group] = counter + INPUT_WEIGHT * prompt_tokens / context.weight
        self._floor = counter
        self.served[context.group] += prompt_tokens

    def _remove(self, waiter: _Waiter) -> None:
        waiters = self._waiting[waiter.context.priority].get(waiter.context.group)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            self._queued -= 1

    def _dispatch(self) -> None:
        while self.running < self._slots and self._queued:
            waiter = self._next()
            if waiter is None:
                return
            self._queued -= 1
            if waiter.future.done():  # cancelled while waiting
                continue
            self._admit(waiter.context, waiter.prompt_tokens)
            waiter.future.set_result(None)

    def _next(self) -> _Waiter | None:
        for priority in CLASSES:
            groups = self._waiting[priority]
            live = [g for g, waiters in groups.items() if waiters]
            if not live:
                continue
            group = min(live, key=lambda g: self.counters.get(g, self._floor))
            waiter = groups[group].popleft()
            if not groups[group]:
                del groups[group]
            return waiter
        return None
