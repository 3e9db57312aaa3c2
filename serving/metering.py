"""Engine time per request: each engine step's duration, divided among its requests.

vLLM's engine core runs steps: schedule, execute the model, process its output. The
scheduler here (``SchedulerConfig.scheduler_cls``, loaded by name in the engine-core process)
times every step, from the start of ``schedule`` to the end of ``update_from_output``, and
splits its duration among the requests scheduled in it, in proportion to their weighted
tokens::

    share(r) = duration * w(r) / sum(w)     w(r) = PREFILL * prefill tokens + DECODE * decode tokens

Steps never overlap in time here: with async scheduling (GPUs) a step's interval starts no
earlier than the previous step's end, so the shares add up to the engine's busy time (the
union of its steps), which the scheduler also counts.

Each output of a request carries, in its ``kv_transfer_params``, the request's engine time so
far and the engine's busy time so far (``ENGINE_MS`` and ``BUSY_MS``, in milliseconds): the
latest output of a request has its total, whether it finished in the engine or was stopped
by the front end (a stop string). A request with ``n`` > 1 is ``n`` requests in the engine
(vLLM names them ``{index}_{parent id}``) whose outputs the front end may merge: their time
is counted together, under the parent. Nothing is kept once a request has finished.

The weights: a prefill token and a decode token do not cost a step the same. They were
measured on this project's CPU engine with ``bench/step_weights.py``, a least-squares fit of
step duration to a step's prefill and decode tokens over 1,029 steps of mixed batches (long
prompts with one output token, short prompts with long outputs, 1 to 96 at once)::

    duration = 3.62 ms + 40.5 us * prefill tokens + 91.9 us * decode tokens    (R^2 0.92)

so a prefill token weighs 0.44 of a decode token (a decode token is a whole row of the
batch's forward pass for one new token; prefill tokens share theirs). The constant per-step
part is divided by the same weights. On another device, run the script there and set
``TOLLGATE_STEP_WEIGHTS=prefill:decode``; the weights only divide each step among its
requests, so the sum of the shares is the busy time whatever they are.
"""

from __future__ import annotations

import os
import time
from typing import Any

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler

__all__ = ["BUSY_MS", "ENGINE_MS", "MeteredAsyncScheduler", "MeteredScheduler", "step_weights"]

#: The key of a request's engine milliseconds so far in an output's ``kv_transfer_params``.
ENGINE_MS = "tollgate_engine_ms"
#: The key of the engine's busy milliseconds so far (since its start).
BUSY_MS = "tollgate_busy_ms"

#: Weight of a prefill token and of a decode token (see the module docstring).
DEFAULT_WEIGHTS = (0.44, 1.0)


def step_weights() -> tuple[float, float]:
    """The (prefill, decode) token weights in force."""
    raw = os.environ.get("TOLLGATE_STEP_WEIGHTS", "")
    if not raw:
        return DEFAULT_WEIGHTS
    try:
        prefill, decode = (float(x) for x in raw.split(":"))
    except ValueError:
        return DEFAULT_WEIGHTS
    if prefill < 0 or decode < 0 or prefill + decode == 0:
        return DEFAULT_WEIGHTS
    return prefill, decode


def _group(request_id: str) -> str:
    """The request whose time an engine request counts to: a choice's parent, or itself."""
    index, sep, parent = request_id.partition("_")
    return parent if sep and index.isdigit() else request_id


class MeteredScheduler(Scheduler):
    """vLLM's scheduler, metering engine time per request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._prefill_w, self._decode_w = step_weights()
        # Each step's prefill tokens, decode tokens and milliseconds, for measuring weights.
        log = os.environ.get("TOLLGATE_STEP_LOG")
        self._log = open(log, "a", buffering=1) if log else None  # noqa: SIM115 - the engine's life
        #: Engine milliseconds per request (the parent's, for the choices of n > 1).
        self._engine_ms: dict[str, float] = {}
        #: The live engine requests of each entry of ``_engine_ms``.
        self._members: dict[str, set[str]] = {}
        self._busy_ms = 0.0
        self._last_end = 0.0
        #: (start, weight per request, prefill and decode tokens) of each step scheduled and
        #: not yet processed.
        self._steps: list[tuple[float, dict[str, float], int, int]] = []

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        output = super().schedule(*args, **kwargs)
        self._scheduled(started, output)
        return output

    def update_from_output(self, scheduler_output: Any, model_runner_output: Any) -> Any:
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        self._processed(outputs)
        return outputs

    def finish_requests(self, request_ids: Any, finished_status: Any) -> Any:
        # Aborted (a client gone, a stop string found by the front end): forget it.
        if request_ids is None:
            self._engine_ms.clear()
            self._members.clear()
        else:
            if not isinstance(request_ids, str):
                request_ids = list(request_ids)  # may be a one-pass iterable
            for request_id in (request_ids,) if isinstance(request_ids, str) else request_ids:
                self._forget(request_id)
        return super().finish_requests(request_ids, finished_status)

    def _scheduled(self, started: float, output: Any) -> None:
        counts: dict[str, int] = output.num_scheduled_tokens
        if not counts:
            return
        weights = {}
        prefills = decodes = 0
        for request_id, n in counts.items():
            request = self.requests.get(request_id)
            prefill = 0
            if request is not None:
                before = request.num_computed_tokens - n
                prefill = min(max(request.num_prompt_tokens - before, 0), n)
            weights[request_id] = prefill * self._prefill_w + (n - prefill) * self._decode_w
            prefills += prefill
            decodes += n - prefill
        self._steps.append((started, weights, prefills, decodes))

    def _processed(self, outputs: dict[int, Any]) -> None:
        if not self._steps:
            return
        started, weights, prefills, decodes = self._steps.pop(0)
        now = time.perf_counter()
        duration = (now - max(started, self._last_end)) * 1000
        self._last_end = now
        if duration <= 0:
            return
        if self._log is not None:
            self._log.write(f"{prefills} {decodes} {len(weights)} {duration:.4f}\n")
        self._busy_ms += duration
        total = sum(weights.values())
        engine_ms = self._engine_ms
        for request_id, weight in weights.items():
            share = duration * weight / total if total else duration / len(weights)
            group = _group(request_id)
            engine_ms[group] = engine_ms.get(group, 0.0) + share
            self._members.setdefault(group, set()).add(request_id)
        for batch in outputs.values():
            for out in batch.outputs:
                spent = engine_ms.get(_group(out.request_id))
                if spent is None:
                    continue
                params = dict(out.kv_transfer_params or {})
                params[ENGINE_MS] = spent
                params[BUSY_MS] = self._busy_ms
                out.kv_transfer_params = params
        # Requests that finished (or were aborted) in this step: nothing more to report.
        for request_id in weights:
            if request_id not in self.requests:
                self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        group = _group(request_id)
        members = self._members.get(group)
        if members is not None:
            members.discard(request_id)
            if members:
                return
            del self._members[group]
        self._engine_ms.pop(group, None)


class MeteredAsyncScheduler(MeteredScheduler, AsyncScheduler):
    """vLLM's async scheduler (GPUs), metering engine time per request: the same metering,
    with ``AsyncScheduler`` after it in the method order (it subclasses ``Scheduler``)."""
