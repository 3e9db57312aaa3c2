"""More models than the device holds: three chat models on a budget that fits two, and the
catalog changed live.

One gateway of the shared deployment serves three copies of the demo chat model
(``chat-a``, ``chat-b``, ``chat-c``) on a device budget of 3.3 GiB. Each engine measures
about 1.4 GiB once started (its processes' proportional memory) and declares 1.6 GiB
before, so two are resident at a time: ``chat-a`` and ``chat-b`` start, ``chat-c`` waits
cold. A second replica of the same deployment has a budget that starts nothing. The tests
run in order, each from where the previous one left the pool.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.placement import ModelProfile, Request, simulate_device
from tests.conftest import Deployment, Gateway, start_gateway, stop_gateway, wait_ready
from tests.support.admin import Admin

MODEL_ENTRY = """
[[models]]
name = "{name}"
source = "{{data_dir}}/models/demo-chat"
kind = "chat"
memory_gb = 1.6
{more}

[models.engine]
max_model_len = 2048
dtype = "float32"
kv_cache_gb = 0.25
max_num_seqs = 16
extra = {{ enforce_eager = true }}
"""
CATALOG = "".join(MODEL_ENTRY.format(name=name, more="") for name in ("chat-a", "chat-b", "chat-c"))
BUDGET_GB = 3.3


@pytest.fixture(scope="module")
def catalog_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pool") / "three-chats.toml"
    path.write_text(CATALOG)
    return path


@pytest.fixture(scope="module")
def pooled(gateway: Gateway, deployment: Deployment, catalog_file: Path) -> Iterator[Gateway]:
    gw = start_gateway(
        deployment,
        catalog_file.with_name("pool.log"),
        "--models",
        str(catalog_file),
        TOLLGATE_DEVICE_MEMORY_GB=str(BUDGET_GB),
        TOLLGATE_COLD_START_TIMEOUT_S="180",
    )
    try:
        wait_ready(gw)
        yield gw
    finally:
        stop_gateway(gw)


@pytest.fixture(scope="module")
def replica(pooled: Gateway, deployment: Deployment, catalog_file: Path) -> Iterator[Gateway]:
    """The same deployment on a budget of 1.5 GiB: none of its models fits at start-up."""
    gw = start_gateway(
        deployment,
        catalog_file.with_name("replica.log"),
        "--models",
        str(catalog_file),
        TOLLGATE_DEVICE_MEMORY_GB="1.5",
    )
    try:
        wait_ready(gw)
        yield gw
    finally:
        stop_gateway(gw)


@pytest.fixture(scope="module")
def key(pooled: Gateway, admin: Admin) -> str:
    return admin.key(admin.tenant("pool-tests"))


@pytest.fixture(scope="module")
def operator(pooled: Gateway, deployment: Deployment) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=pooled.base_url + "/admin/v1",
        headers={"authorization": f"Bearer {deployment.admin_token}"},
        timeout=30,
    ) as c:
        yield c


def models(operator: httpx.Client) -> dict[str, dict[str, Any]]:
    answer = operator.get("/models")
    assert answer.status_code == 200, answer.text
    return {row["name"]: row for row in answer.json()["data"]}


def states(operator: httpx.Client) -> dict[str, str]:
    return {name: row["state"] for name, row in models(operator).items()}


def chat(model: str, max_tokens: int = 4, **more: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": max_tokens,
        **more,
    }


def api(pooled: Gateway, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=pooled.api_url, headers={"authorization": f"Bearer {key}"}, timeout=300
    )


def test_two_of_three_start_and_the_third_waits_cold(
    pooled: Gateway, operator: httpx.Client
) -> None:
    rows = models(operator)
    assert {n: r["state"] for n, r in rows.items()} == {
        "chat-a": "ready",
        "chat-b": "ready",
        "chat-c": "cold",
    }, rows
    # Measured after start, and two of them within the budget.
    assert rows["chat-a"]["memory_measured"], rows
    assert rows["chat-b"]["memory_measured"], rows
    placement = operator.get("/placement").json()
    assert placement["budget_gb"] == BUDGET_GB
    assert placement["resident"] == ["chat-a", "chat-b"]
    assert placement["used_gb"] <= BUDGET_GB, placement
    # Cold models do not make the gateway unready: they come in on demand.
    assert httpx.get(pooled.base_url + "/readyz").status_code == 200


def test_an_invalid_request_for_a_cold_model_is_refused_without_waking_it(
    pooled: Gateway, key: str, operator: httpx.Client
) -> None:
    with httpx.Client(
        base_url=pooled.api_url, headers={"authorization": f"Bearer {key}"}, timeout=60
    ) as http:
        too_long = chat("chat-c", max_tokens=10)
        too_long["messages"][0]["content"] = "word " * 3000
        answer = http.post("/chat/completions", json=too_long)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == "context_length_exceeded"
        answer = http.post("/chat/completions", json=chat("chat-c", temperature=7))
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == "temperature"
        answer = http.post("/chat/completions", json=chat("chat-c", logit_bias={"99999": 1}))
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == "logit_bias"
    row = models(operator)["chat-c"]
    assert row["state"] == "cold", row
    assert row["cold_starts"] == 0, row


def test_the_least_recently_used_model_leaves_and_the_simulator_counts_the_same_cold_starts(
    pooled: Gateway, key: str, operator: httpx.Client
) -> None:
    """Five requests, one after the other, through the pool and through the planner's
    simulator: chat-c takes the place of chat-a (the least recently used), then chat-a takes
    chat-c's; the same two cold starts both ways."""
    rows = models(operator)
    assert [n for n, r in rows.items() if r["state"] == "ready"] == ["chat-a", "chat-b"]
    order = ["chat-a", "chat-b", "chat-c", "chat-b", "chat-a"]
    trace = [
        Request(t=100.0 * i, model=m, prompt_tokens=8, output_tokens=4) for i, m in enumerate(order)
    ]
    profiles = {
        name: ModelProfile(memory_gb=row["memory_gb"], start_s=30.0, stop_s=5.0)
        for name, row in rows.items()
    }
    simulated, _ = simulate_device(
        trace, profiles, BUDGET_GB, 60_000.0, resident=["chat-a", "chat-b"]
    )
    before = sum(r["cold_starts"] for r in rows.values())
    waits: dict[int, float] = {}
    with httpx.Client(
        base_url=pooled.api_url, headers={"authorization": f"Bearer {key}"}, timeout=300
    ) as http:
        for i, model in enumerate(order):
            # Streamed: an answer that had to wait says how long, with its first bytes.
            with http.stream("POST", "/chat/completions", json=chat(model, stream=True)) as answer:
                assert answer.status_code == 200
                if "x-tollgate-cold-start-ms" in answer.headers:
                    waits[i] = float(answer.headers["x-tollgate-cold-start-ms"])
                body = answer.read().decode()
            assert body.rstrip().endswith("data: [DONE]"), body
            if model == "chat-c":
                assert states(operator) == {
                    "chat-a": "cold",
                    "chat-b": "ready",
                    "chat-c": "ready",
                }
    after = models(operator)
    assert sorted(waits) == [2, 4], waits  # chat-c, then chat-a again
    assert min(waits.values()) > 1000, waits
    assert simulated.cold_starts == 2
    assert sum(r["cold_starts"] for r in after.values()) - before == simulated.cold_starts
    assert {n: r["state"] for n, r in after.items()} == {
        "chat-a": "ready",
        "chat-b": "ready",
        "chat-c": "cold",
    }
    assert after["chat-a"]["evictions"] == 1
    assert after["chat-c"]["evictions"] == 1
    assert after["chat-a"]["last_cold_start_ms"] <= waits[4] + 50


async def test_a_model_with_a_request_in_flight_is_not_taken_out(
    pooled: Gateway, key: str, operator: httpx.Client
) -> None:
    """chat-b streams a long answer, then chat-a answers a short one: chat-b is the least
    recently used, but chat-a leaves for chat-c, and the stream ends in full."""
    async with api(pooled, key) as http:

        async def long_stream() -> tuple[int, str | None, float]:
            tokens, finish = 0, None
            body = chat("chat-b", max_tokens=1800, stream=True, ignore_eos=True)
            body["stream_options"] = {"include_usage": True}
            async with http.stream("POST", "/chat/completions", json=body) as answer:
                assert answer.status_code == 200
                async for line in answer.aiter_lines():
                    if line.startswith("data: {"):
                        event = httpx.Response(200, content=line[6:]).json()
                        for choice in event.get("choices", []):
                            finish = choice.get("finish_reason") or finish
                        if event.get("usage"):
                            tokens = event["usage"]["completion_tokens"]
            return tokens, finish, time.monotonic()

        stream = asyncio.create_task(long_stream())
        for _ in range(200):
            if (await asyncio.to_thread(models, operator))["chat-b"]["inflight"]:
                break
            await asyncio.sleep(0.05)
        answer = await http.post("/chat/completions", json=chat("chat-a"))
        assert answer.status_code == 200, answer.text
        asked = time.monotonic()
        answer = await http.post("/chat/completions", json=chat("chat-c"))
        assert answer.status_code == 200, answer.text
        assert float(answer.headers["x-tollgate-cold-start-ms"]) > 1000
        tokens, finish, ended = await stream
    if ended < asked:
        pytest.fail("the stream ended before chat-c was asked for: make it longer")
    assert (tokens, finish) == (1800, "length")
    rows = await asyncio.to_thread(models, operator)
    assert {n: r["state"] for n, r in rows.items()} == {
        "chat-a": "cold",
        "chat-b": "ready",
        "chat-c": "ready",
    }, rows
    assert rows["chat-b"]["evictions"] == 0
    assert rows["chat-a"]["evictions"] == 2


def deploy(operator: httpx.Client, name: str, **body: Any) -> httpx.Response:
    return operator.put(f"/models/{name}", json=body)


async def test_a_model_deployed_live_is_served_by_another_replica_and_retired_after_draining(
    pooled: Gateway, replica: Gateway, key: str, operator: httpx.Client, deployment: Deployment
) -> None:
    answer = await asyncio.to_thread(deploy, operator, "chat-d", source="/nowhere/model")
    assert answer.status_code == 400, answer.text
    assert "/nowhere/model" in answer.json()["error"]["message"]
    assert answer.json()["error"]["param"] == "source"
    answer = await asyncio.to_thread(
        deploy,
        operator,
        "chat-d",
        source="{data_dir}/models/demo-chat",
        engine={"extra": {"no_such_engine_argument": 1}},
    )
    assert answer.status_code == 400, answer.text
    assert "no_such_engine_argument" in answer.json()["error"]["message"]
    assert answer.json()["error"]["param"] == "engine"
    answer = await asyncio.to_thread(
        deploy,
        operator,
        "chat-d",
        source="{data_dir}/models/demo-chat",
        memory_gb=1.5,
        engine={
            "max_model_len": 2048,
            "dtype": "float32",
            "kv_cache_gb": 0.25,
            "extra": {"enforce_eager": True},
        },
    )
    assert answer.status_code == 201, answer.text
    assert answer.json()["state"] == "cold"
    deployed = time.monotonic()
    async with api(replica, key) as other:
        while True:
            listed = await other.get("/models")
            if "chat-d" in {m["id"] for m in listed.json()["data"]}:
                break
            assert time.monotonic() - deployed < 10, "the other replica did not see chat-d"
            await asyncio.sleep(0.2)
        body = chat("chat-d", max_tokens=600, stream=True, ignore_eos=True)
        async with other.stream("POST", "/chat/completions", json=body) as stream:
            assert stream.status_code == 200
            assert float(stream.headers["x-tollgate-cold-start-ms"]) > 1000
            lines = stream.aiter_lines()
            async for line in lines:
                if line.startswith("data: {"):
                    break
            # Retired while this stream runs: the stream ends in full, new requests 404.
            gone = await asyncio.to_thread(operator.delete, "/models/chat-d")
            assert gone.status_code == 200, gone.text
            assert gone.json() == {"id": "chat-d", "object": "model", "deleted": True}
            # The other replica hears of it within its catalog refresh (2 s).
            retired = time.monotonic()
            while (
                refused := await other.post("/chat/completions", json=chat("chat-d"))
            ).is_success:
                assert time.monotonic() - retired < 10, "the other replica still serves chat-d"
                await asyncio.sleep(0.3)
            rest = [line async for line in lines if line]
        assert refused.status_code == 404, refused.text
        assert refused.json()["error"]["code"] == "model_not_found"
        assert rest[-1] == "data: [DONE]", rest[-3:]
        finishes = [x for x in rest if '"finish_reason":"length"' in x]
        assert finishes, rest[-3:]
    answer = await asyncio.to_thread(operator.delete, "/models/chat-d")
    assert answer.status_code == 404


def test_an_idle_timeout_set_live_takes_an_idle_model_out(
    operator: httpx.Client, pooled: Gateway
) -> None:
    row = models(operator)["chat-c"]
    answer = deploy(
        operator,
        "chat-c",
        source="{data_dir}/models/demo-chat",
        memory_gb=1.6,
        idle_timeout_s=3,
        engine={
            "max_model_len": 2048,
            "dtype": "float32",
            "kv_cache_gb": 0.25,
            "max_num_seqs": 16,
            "extra": {"enforce_eager": True},
        },
    )
    assert answer.status_code == 200, answer.text
    # The same engine: a change of pool settings does not restart it.
    assert answer.json()["state"] == "ready"
    assert answer.json()["cold_starts"] == row["cold_starts"]
    deadline = time.monotonic() + 20
    while (row := models(operator)["chat-c"])["state"] != "cold":
        assert time.monotonic() < deadline, row
        time.sleep(0.5)
    assert row["idle_stops"] == 1, row
    assert models(operator)["chat-b"]["state"] == "ready"  # no idle timeout of its own
    # /metrics says what the admin API says.
    text = httpx.get(pooled.base_url + "/metrics", headers=operator.headers).text
    samples = {
        (sample.name, sample.labels.get("model"), sample.labels.get("state")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    for name, row in models(operator).items():
        assert samples[("tollgate_model_cold_starts_total", name, None)] == row["cold_starts"]
        assert samples[("tollgate_model_evictions_total", name, None)] == row["evictions"]
        assert samples[("tollgate_model_state", name, row["state"])] == 1
    assert samples[("tollgate_model_idle_stops_total", "chat-c", None)] == 1
    assert httpx.get(pooled.base_url + "/readyz").status_code == 200


def test_the_pool_is_the_operators_to_see_and_change(pooled: Gateway, key: str) -> None:
    auth = {"authorization": f"Bearer {key}"}
    base = pooled.base_url + "/admin/v1"
    for path in ("/models", "/placement"):
        answer = httpx.get(base + path, headers=auth)
        assert answer.status_code == 403, answer.text
    answer = httpx.put(base + "/models/chat-x", headers=auth, json={"source": "/srv/none"})
    assert answer.status_code == 403, answer.text
    answer = httpx.delete(base + "/models/chat-b", headers=auth)
    assert answer.status_code == 403, answer.text
