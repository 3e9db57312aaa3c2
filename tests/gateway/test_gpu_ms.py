"""Engine time per request: every answer's ``gpu_ms`` adds up to the engine's busy time.

A mixed run on the real engine (prompts short and long, streamed and not, several prompts
and several choices per call, all at once): the sum of the answers' ``gpu_ms`` equals the
busy time the engine's scheduler counted over the run within 2%, and each answer's figure
is the same in its usage, its header and its ledger event.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import httpx
import pytest

from tests.conftest import Gateway, engine_stats, wait_idle
from tests.support.admin import Admin
from tests.support.waits import events_of

MODEL = "demo-chat"


async def one(api: httpx.AsyncClient, path: str, body: dict[str, Any]) -> tuple[float, str]:
    """(gpu_ms from the usage, request id) of one call."""
    if not body.get("stream"):
        reply = await api.post(path, json=body)
        assert reply.status_code == 200, reply.text
        usage = reply.json()["usage"]
        assert reply.headers["x-tollgate-gpu-ms"] == f"{usage['gpu_ms']:.3f}"
        return usage["gpu_ms"], reply.headers["x-request-id"]
    body = {**body, "stream_options": {"include_usage": True}}
    usage = None
    async with api.stream("POST", path, json=body) as reply:
        assert reply.status_code == 200
        async for line in reply.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
        rid = reply.headers["x-request-id"]
    assert usage is not None
    return usage["gpu_ms"], rid


def busy_ms(http: httpx.Client) -> float:
    return float(engine_stats(http, MODEL)["busy_ms"])


async def test_gpu_ms_adds_up_to_the_engine_busy_time(
    gateway: Gateway, admin: Admin, http: httpx.Client
) -> None:
    tenant = admin.tenant("gpu-ms-" + secrets.token_hex(3))
    key = admin.key(tenant)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    calls: list[tuple[str, dict[str, Any]]] = []
    for i in range(16):
        prompt = " ".join(words[j % len(words)] for j in range(5 + 60 * (i % 4)))
        sampling = {"temperature": 0.9, "max_tokens": 8 + 24 * (i % 5), "ignore_eos": True}
        stream = i % 2 == 0
        if i % 3 == 2:
            calls.append(
                (
                    "/v1/completions",
                    {"model": MODEL, "prompt": [prompt, prompt[::-1]], "stream": stream} | sampling,
                )
            )
        else:
            calls.append(
                (
                    "/v1/chat/completions",
                    {
                        "model": MODEL,
                        "messages": [{"role": "user", "content": f"{i} {prompt}"}],
                        "n": 1 + i % 2,
                        "stream": stream,
                    }
                    | sampling,
                )
            )
    async with httpx.AsyncClient(
        base_url=gateway.base_url, headers={"authorization": f"Bearer {key}"}, timeout=120
    ) as api:
        await one(api, "/v1/chat/completions", calls[1][1])  # the engine's state is now known
        wait_idle(http, MODEL)
        before = busy_ms(http)
        results = await asyncio.gather(*(one(api, path, body) for path, body in calls))
    wait_idle(http, MODEL)
    busy = busy_ms(http) - before
    total = sum(ms for ms, _ in results)
    assert busy > 0
    assert all(ms > 0 for ms, _ in results), results
    assert abs(total - busy) <= 0.02 * busy, (total, busy)

    rows = {r["id"]: r for r in events_of(admin, tenant, len(calls) + 1)}
    for ms, rid in results:
        assert rows[rid]["gpu_ms"] == pytest.approx(ms, abs=0.001)
