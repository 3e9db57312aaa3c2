"""The placement planner and its simulator, on the shipped 20-model trace and on small ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import main
from serving.placement import (
    COSTS,
    ModelProfile,
    Request,
    generate_trace,
    load_trace,
    plan_fleet,
    profiles_from,
    report,
    simulate_device,
    write_trace,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "placement"
TRACE = DATA / "trace-20-models.jsonl"


def test_the_shipped_trace_is_the_generators_output(tmp_path: Path) -> None:
    trace, sizes = generate_trace()
    write_trace(trace, tmp_path / "t.jsonl")
    assert (tmp_path / "t.jsonl").read_bytes() == TRACE.read_bytes()
    assert sizes == json.loads((DATA / "trace-20-models.models.json").read_text())
    assert len({r.model for r in trace}) == 20


@pytest.mark.parametrize("costs", sorted(COSTS))
def test_the_simulators_figures_on_the_shipped_trace_are_stable(
    costs: str, capsys: pytest.CaptureFixture[str]
) -> None:
    shipped = (DATA / f"simulate-{costs}.txt").read_text()
    for _ in range(2):
        assert main(["placement", "simulate", "--trace", str(TRACE), "--costs", costs]) == 0
        assert capsys.readouterr().out == shipped


def test_the_shipped_trace_needs_far_fewer_devices_than_one_per_model() -> None:
    trace = load_trace(TRACE)
    sizes = json.loads((DATA / "trace-20-models.models.json").read_text())
    plan = plan_fleet(trace, profiles_from(sizes, COSTS["gpu-sleep"]), 80.0, 5000.0)
    assert plan.baseline_devices == 20
    assert plan.ratio <= 0.15, report(plan, trace)
    assert plan.within_slo_share >= 0.99
    # Fewer devices than that do not meet the goal (the plan is the smallest).
    one_less = plan_fleet(trace, profiles_from(sizes, COSTS["gpu-sleep"]), 80.0, 5000.0, 1.0)
    assert one_less.devices >= plan.devices


def profile(memory_gb: float, **more: float) -> ModelProfile:
    return ModelProfile(
        memory_gb=memory_gb,
        start_s=10.0,
        stop_s=2.0,
        prefill_tokens_per_s=1e9,
        decode_tokens_per_s=10.0,
        **more,  # type: ignore[arg-type]
    )


def test_the_least_recently_used_model_leaves_and_switches_are_counted() -> None:
    profiles = {name: profile(1.0) for name in "abc"}
    trace = [
        Request(t=t, model=m, prompt_tokens=1, output_tokens=1)
        for t, m in ((0, "a"), (1, "b"), (100, "c"), (200, "a"), (300, "b"))
    ]
    plan, ttfts = simulate_device(trace, profiles, 2.0, 1000.0, resident=["a", "b"])
    # c evicts a (LRU); a evicts b; b evicts c.
    assert plan.cold_starts == 3
    assert plan.switching_s == 3 * (10.0 + 2.0)
    assert [round(v) for v in ttfts] == [0, 0, 12_000, 12_000, 12_000]
    assert plan.within_slo == 2


def test_a_model_with_a_request_in_flight_is_not_taken_out() -> None:
    profiles = {name: profile(1.0) for name in "abc"}
    trace = [
        # b's request runs until t = 101 (1,000 tokens at 10 tokens/s).
        Request(t=0, model="a", prompt_tokens=1, output_tokens=1),
        Request(t=1, model="b", prompt_tokens=1, output_tokens=1000),
        Request(t=2, model="c", prompt_tokens=1, output_tokens=1),
        Request(t=50, model="b", prompt_tokens=1, output_tokens=1),
    ]
    plan, ttfts = simulate_device(trace, profiles, 2.0, 1000.0, resident=["a", "b"])
    assert plan.cold_starts == 1  # c took a's place, b stayed
    assert round(ttfts[3]) == 0


def test_sleeping_models_wake_for_less_than_a_start() -> None:
    profiles = {name: profile(1.0, sleep_s=0.5, wake_s=1.0) for name in "ab"}
    trace = [
        Request(t=t, model=m, prompt_tokens=1, output_tokens=1)
        for t, m in ((0, "a"), (10, "b"), (20, "a"))
    ]
    plan, ttfts = simulate_device(trace, profiles, 1.0, 5000.0, resident=["a"])
    # b: a sleeps (0.5 s) and b starts (10 s), ready at 20.5; a: b's answer ends at 20.6,
    # then b sleeps (0.5 s) and a wakes (1 s): ready at 22.1.
    assert [round(v, 1) for v in ttfts] == [0.0, 10_500.0, 2_100.0]
    assert plan.cold_starts == 2


def test_a_trace_naming_a_model_without_a_profile_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_trace(
        [Request(t=0, model="nowhere", prompt_tokens=1, output_tokens=1)], tmp_path / "t.jsonl"
    )
    (tmp_path / "t.models.json").write_text("{}")
    assert main(["placement", "simulate", "--trace", str(tmp_path / "t.jsonl")]) == 2
    assert "nowhere" in capsys.readouterr().err
