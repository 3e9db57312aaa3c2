"""Concurrency reaches the engine as batches; a vanished client frees its slot."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai

from tests.conftest import Gateway, engine_stats, wait_idle

MODEL = "demo-chat"


async def test_concurrent_requests_are_batched(
    aclient: openai.AsyncOpenAI, gateway: Gateway, http: httpx.Client
) -> None:
    before = wait_idle(http, MODEL)
    running: list[int] = []
    sampling = True

    async def sample() -> None:
        # What vLLM's scheduler reports running in its latest step, while the 32 run.
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=10) as probe:
            while sampling:
                body = (await probe.get("/readyz")).json()
                running.append(int(body["models"][MODEL]["running"]))
                await asyncio.sleep(0.01)

    async def one(i: int) -> int:
        reply = await aclient.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"request number {i}"}],
            max_tokens=256,
            extra_body={"ignore_eos": True},
        )
        assert reply.usage is not None
        return reply.usage.completion_tokens

    sampler = asyncio.create_task(sample())
    try:
        tokens = await asyncio.gather(*(one(i) for i in range(32)))
    finally:
        sampling = False
        await sampler
    assert tokens == [256] * 32
    after = wait_idle(http, MODEL)
    # vLLM's scheduler ran most of the 32 sequences in the same steps, not one by one.
    assert max(running) >= 16, running
    assert after["requests_finished"] - before["requests_finished"] == 32


def test_client_disconnect_mid_stream_frees_the_engine_slot(
    gateway: Gateway, http: httpx.Client
) -> None:
    before = wait_idle(http, MODEL)
    clients = [
        httpx.Client(base_url=gateway.base_url, timeout=60, headers=http.headers) for _ in range(3)
    ]
    responses = []
    readers = []  # keep each line iterator alive: a collected one closes its connection
    try:
        for i, c in enumerate(clients):
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"a long answer please {i}"}],
                "max_tokens": 1800,
                "ignore_eos": True,
                "stream": True,
            }
            response = c.send(
                c.build_request("POST", "/v1/chat/completions", json=body), stream=True
            )
            lines = response.iter_lines()
            readers.append(lines)
            seen = 0
            for line in lines:
                if '"content"' in line and '"role"' not in line:
                    seen += 1
                    if seen == 2:
                        break
            responses.append(response)
        deadline = time.monotonic() + 10
        while engine_stats(http, MODEL)["running"] < 3:
            assert time.monotonic() < deadline, "the three streams never ran together"
            time.sleep(0.02)
    finally:
        for response in responses:
            response.close()
        for c in clients:
            c.close()
    after = wait_idle(http, MODEL, timeout=10)
    # The slots were freed by an abort, not by running 1,800 tokens each to the end.
    assert after["requests_finished"] == before["requests_finished"]
    # The engine still serves afterwards.
    reply = http.post(
        "/v1/completions", json={"model": MODEL, "prompt": "still alive", "max_tokens": 2}
    )
    assert reply.status_code == 200


def test_client_disconnect_before_a_non_streamed_answer_aborts_it(
    gateway: Gateway, http: httpx.Client
) -> None:
    before = wait_idle(http, MODEL)
    body = {
        "model": MODEL,
        "prompt": "a long non-streamed answer",
        "max_tokens": 1900,
        "ignore_eos": True,
    }
    with httpx.Client(base_url=gateway.base_url, timeout=0.5, headers=http.headers) as c:
        try:
            c.post("/v1/completions", json=body)
        except httpx.ReadTimeout:
            pass
        else:
            raise AssertionError("a 1,900-token answer came back within half a second")
    after = wait_idle(http, MODEL, timeout=10)
    assert after["requests_finished"] == before["requests_finished"]
