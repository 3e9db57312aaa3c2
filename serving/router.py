"""Which worker serves a request: residency, load and prefix affinity.

A prompt is cut into blocks of `BLOCK` tokens, and each block gets a chain hash (the hash of
the model, the block's tokens and the previous block's hash), so two prompts share the
hashes of exactly the blocks they share from the start. A worker is known to hold a prefix
when it served a prompt with that block hash: it says so in the registry (the hashes of
what it served lately, from every gateway), and the router remembers where it sent each
prompt itself (immediately, before the next heartbeat).

With ``affinity``, among the workers where the model is resident: the router knows which
blocks prompts continue in different ways (a system prompt that conversations share ends
at such a block), and takes the first block after the deepest of them as the prompt's key,
the same at every turn of a conversation. When some worker holds more of the prompt than
that shared part (the next turn of a conversation), the router prefers the one holding the
longest prefix; otherwise (a new conversation) it prefers the worker whose conversations
of the last minutes hold the fewest blocks (SGLang's cache-aware router sends unmatched
requests to the worker with the smallest cache tree for the same reason), then the
rendezvous hash of the key, so that conversations divide among the workers and each
worker's KV cache holds its share of them, not all of them. It takes the first whose load
is under the bound ``ceil((1 + balance) * (total load + 1) / workers)`` (consistent
hashing with bounded loads, Mirrokni, Thorup and Zadimoghaddam, 2018), so that no worker
takes more than its share times ``1 + balance``. ``round_robin`` ignores prefixes (the
baseline the benchmark compares against).

A model resident nowhere is brought in where `serving.placement.choose_device` says: where
it fits without evicting anything, on the cheapest device per hour.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from serving.placement import DeviceOffer, choose_device
from serving.wire import ModelOnWorker, WorkerInfo

__all__ = ["BLOCK", "Route", "Router", "prefix_hashes"]

#: Tokens per hashed block of a prompt.
BLOCK = 32
#: Blocks hashed per prompt at most (the first ``BLOCK * MAX_BLOCKS`` tokens).
MAX_BLOCKS = 256

Routing = Literal["affinity", "round_robin"]

_BRANCH = "*"
_MAX_CHILDREN = 262_144
#: Conversations remembered per router: about what the workers' KV caches hold.
_MAX_SESSIONS = 4096
#: A conversation without a turn for this long no longer counts as held by its worker (its
#: blocks have likely left the KV cache; a next turn still finds them if they have not).
_SESSION_IDLE_S = 300.0

#: Model states that hold the device (the model answers without a cold start, or soon).
_RESIDENT = frozenset({"ready", "starting", "waking"})
#: States from which a request brings the model in.
_LOADABLE = frozenset({"cold", "sleeping", "stopping"})


def prefix_hashes(model: str, prompt: Sequence[int], salt: str | None = None) -> list[str]:
    """The chain hashes of the prompt's whole blocks (at least one, for short prompts)."""
    previous = hashlib.blake2b(f"{model}\0{salt or ''}".encode(), digest_size=8).digest()
    hashes = []
    blocks = max(1, min(len(prompt) // BLOCK, MAX_BLOCKS))
    for i in range(blocks):
        block = prompt[i * BLOCK : (i + 1) * BLOCK]
        h = hashlib.blake2b(previous, digest_size=8)
        h.update(b"".join(t.to_bytes(4, "little", signed=False) for t in block))
        previous = h.digest()
        hashes.append(previous.hex())
    return hashes


def _score(key: str, worker_id: str) -> bytes:
    return hashlib.blake2b(f"{key}\0{worker_id}".encode(), digest_size=8).digest()


@dataclass
class Route:
    """A routing decision: the worker, and why (for spans and tests)."""

    worker: WorkerInfo
    #: Blocks of the prompt the worker was known to hold.
    matched_blocks: int
    #: ``affinity``, ``balance`` (the preferred workers were over the bound),
    #: ``round_robin``, ``placement`` (the model was resident nowhere).
    reason: str


@dataclass
class _Known:
    """Block hashes a worker holds, as far as this router knows (bounded, LRU)."""

    hashes: OrderedDict[str, None] = field(default_factory=OrderedDict)
    limit: int = 65536

    def add(self, items: Iterable[str]) -> None:
        for h in items:
            self.hashes[h] = None
            self.hashes.move_to_end(h)
        while len(self.hashes) > self.limit:
            self.hashes.popitem(last=False)

    def depth(self, hashes: Sequence[str], advertised: set[str]) -> int:
        depth = 0
        for h in hashes:
            if h in self.hashes or h in advertised:
                depth += 1
            else:
                break
        return depth


class Router:
    """Chooses a worker per request from the registry's view (`update`)."""

    def __init__(self, routing: Routing = "affinity", *, balance: float = 0.5) -> None:
        self.routing = routing
        self.balance = balance
        self._workers: dict[str, WorkerInfo] = {}
        self._advertised: dict[str, set[str]] = {}
        self._known: dict[str, _Known] = {}
        #: Requests this router has in flight on each worker.
        self.inflight: dict[str, int] = {}
        #: Requests routed, per worker and reason; the most in flight on each worker at once.
        self.routed: dict[tuple[str, str], int] = {}
        self.peak_inflight: dict[str, int] = {}
        #: Workers that failed a call, until when they are left out.
        self._down: dict[str, float] = {}
        self._turn = itertools.count()
        #: Each block hash's following block in the prompts routed, or `_BRANCH` when
        #: prompts continue it differently (a shared prefix ends there).
        self._children: OrderedDict[str, str] = OrderedDict()
        #: Conversations (their keys) lately routed: the worker each went to, when, and its
        #: blocks at its latest turn; and the blocks of the conversations each worker holds.
        self._sessions: OrderedDict[str, tuple[str, float, int]] = OrderedDict()
        self._held: dict[str, int] = {}

    def update(self, workers: list[WorkerInfo]) -> None:
        self._workers = {w.id: w for w in workers}
        self._advertised = {w.id: set(w.prefixes) for w in workers}
        for gone in set(self._known) - set(self._workers):
            del self._known[gone]

    @property
    def workers(self) -> list[WorkerInfo]:
        return list(self._workers.values())

    def mark_down(self, worker_id: str, for_s: float = 5.0) -> None:
        """Leave a worker out for a while (a call to it failed before its first byte)."""
        self._down[worker_id] = time.monotonic() + for_s

    def _up(self, worker: WorkerInfo) -> bool:
        if worker.draining:
            return False
        until = self._down.get(worker.id)
        if until is None:
            return True
        if until < time.monotonic():
            del self._down[worker.id]
            return True
        return False

    def holders(self, model: str) -> list[tuple[WorkerInfo, ModelOnWorker]]:
        """The workers that serve ``model`` (any state), with their view of it."""
        found = []
        for worker in self._workers.values():
            for m in worker.models:
                if m.name == model:
                    found.append((worker, m))
                    break
        return found

    def load(self, worker: WorkerInfo) -> int:
        """This router's requests in flight on ``worker``: each gateway bounds its own (exact,
        where the registry's figures are a heartbeat old), so the fleet's sum is bounded too."""
        return self.inflight.get(worker.id, 0)

    def choose(
        self,
        model: str,
        hashes: Sequence[str],
        *,
        exclude: frozenset[str] = frozenset(),
    ) -> Route | None:
        """The worker for a request, or ``None`` when no live worker has the model."""
        holders = [
            (w, m)
            for w, m in self.holders(model)
            if w.id not in exclude and self._up(w) and m.state != "failed"
        ]
        if not holders:
            return None
        resident = sorted((w for w, m in holders if m.state in _RESIDENT), key=lambda w: w.id)
        if not resident:
            return self._place(holders)
        if self.routing == "round_robin":
            return Route(resident[next(self._turn) % len(resident)], 0, "round_robin")
        depth = {w.id: self._depth(w.id, hashes) for w in resident}
        best = max(depth.values())
        # The prompt's own part starts after its deepest block that other prompts continue
        # differently (a system prompt shared by conversations): its first block is the
        # conversation's key, the same at every turn.
        split = self._split(hashes)
        key = hashes[min(split, len(hashes) - 1)] if hashes else model
        if best > split:
            # The prompt's own blocks are cached somewhere (a conversation's next turn): on
            # the conversation's home worker when it holds them (a turn sent elsewhere while
            # home was over its bound does not move the conversation), else the deepest.
            home = self._sessions.get(key, ("", 0.0, 0))[0]
            order = sorted(
                resident,
                key=lambda w: (
                    not (w.id == home and depth[w.id] > split),
                    -depth[w.id],
                    _score(key, w.id),
                ),
            )
        else:
            # A new conversation, sharing a system prompt at most: to the worker whose recent
            # conversations hold the fewest blocks, so that each worker's KV cache holds its
            # share of them (the shared part is prefilled once per worker; a short one-off
            # request weighs what it holds, not as much as a long conversation); ties by
            # its key.
            held = self._held
            order = sorted(resident, key=lambda w: (held.get(w.id, 0), _score(key, w.id)))
        total = sum(self.load(w) for w in resident) + 1
        bound = math.ceil((1 + self.balance) * total / len(resident))
        for i, worker in enumerate(order):
            if self.load(worker) < bound:
                return Route(worker, depth[worker.id], "affinity" if i == 0 else "balance")
        worker = min(order, key=self.load)  # cannot happen: the bound is above the average
        return Route(worker, depth[worker.id], "balance")

    def _split(self, hashes: Sequence[str]) -> int:
        """The index of the first block after the prompt's deepest shared block: one that
        prompts routed before continue differently, or that this prompt continues
        differently from them (the second of two new conversations on one system prompt,
        before the first one's next turn)."""
        split = 0
        children = self._children
        for i, (h, following) in enumerate(itertools.pairwise(hashes)):
            seen = children.get(h)
            if seen is not None and seen != following:
                split = i + 1
        return split

    def _learn(self, hashes: Sequence[str]) -> None:
        children = self._children
        for h, following in itertools.pairwise(hashes):
            seen = children.get(h)
            if seen is None:
                children[h] = following
            elif seen != following and seen != _BRANCH:
                children[h] = _BRANCH
            children.move_to_end(h)
        while len(children) > _MAX_CHILDREN:
            children.popitem(last=False)

    def _hold(self, hashes: Sequence[str], worker_id: str) -> None:
        """Remember the conversation of the prompt ``hashes``: its key is the first block
        after the shared part, its home is where it started (or where it went once its home
        had left the fleet), its weight the prompt's blocks."""
        sessions = self._sessions
        split = min(self._split(hashes), len(hashes) - 1)
        key, now = hashes[split], time.monotonic()
        home: str | None = None
        earlier = sessions.pop(key, None)
        if earlier is not None:
            home = earlier[0]
            self._release(earlier)
        for shared in hashes[:split]:
            # This conversation keyed on a block that has turned out to be shared (the
            # first conversation on a system prompt, before a second one showed where it
            # ends; its home holds this prompt's own blocks): keyed anew, at that home.
            mis_keyed = sessions.get(shared)
            if mis_keyed is None or self._depth(mis_keyed[0], hashes) <= split:
                continue
            del sessions[shared]
            self._release(mis_keyed)
            if home is None:
                home = mis_keyed[0]
        if home is None or home not in self._workers:
            home = worker_id
        sessions[key] = (home, now, len(hashes))
        self._held[home] = self._held.get(home, 0) + len(hashes)
        while sessions and (
            len(sessions) > _MAX_SESSIONS
            or next(iter(sessions.values()))[1] < now - _SESSION_IDLE_S
        ):
            self._release(sessions.popitem(last=False)[1])

    def _release(self, session: tuple[str, float, int]) -> None:
        home, _, blocks = session
        left = self._held.get(home, 0) - blocks
        if left > 0:
            self._held[home] = left
        else:
            self._held.pop(home, None)

    def _depth(self, worker_id: str, hashes: Sequence[str]) -> int:
        known = self._known.get(worker_id)
        advertised = self._advertised.get(worker_id, set())
        if known is None:
            known = _Known()
        return known.depth(hashes, advertised)

    def _place(self, holders: list[tuple[WorkerInfo, ModelOnWorker]]) -> Route:
        offers = [
            DeviceOffer(
                id=w.id,
                free_gb=w.budget_gb - w.used_gb,
                cost_per_hour=float(w.cost_per_hour or 0),
                load=self.load(w),
            )
            for w, _ in holders
        ]
        memory = max(m.memory_gb for _, m in holders)
        chosen = choose_device(memory, offers)
        worker = next(w for w, _ in holders if w.id == chosen)
        return Route(worker, 0, "placement")

    def started(self, route: Route, hashes: Sequence[str]) -> None:
        """A request was sent to the route's worker: its prompt's blocks will be there."""
        worker_id = route.worker.id
        load = self.inflight[worker_id] = self.inflight.get(worker_id, 0) + 1
        self.peak_inflight[worker_id] = max(self.peak_inflight.get(worker_id, 0), load)
        key = (worker_id, route.reason)
        self.routed[key] = self.routed.get(key, 0) + 1
        self._learn(hashes)
        if hashes:
            # Before the worker is known to hold this prompt: whether the prompt continues a
            # conversation already there is told by what the worker held before it.
            self._hold(hashes, worker_id)
        self._known.setdefault(worker_id, _Known()).add(hashes)

    def ended(self, worker_id: str) -> None:
        left = self.inflight.get(worker_id, 0) - 1
        if left > 0:
            self.inflight[worker_id] = left
        else:
            self.inflight.pop(worker_id, None)
