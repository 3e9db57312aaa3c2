"""Engine work per request: the response cache, single flight, prefix reuse, fair batching and
engine time per request, against the same workloads with the feature off and against vLLM's
own OpenAI server.

Starts ``tollgate serve`` (the embedded default, a tenant's key) and vLLM's server
(``python -m vllm.entrypoints.openai.api_server``) on ``demo-chat`` with the same engine
sizes, then runs, in one go:

1. **Zipf mix.** ``--requests`` deterministic completions (``temperature`` 0) drawn from
   ``--distinct`` prompts with Zipf popularity (s = 1.1), 32 at a time, in chunks that
   visit, in a fresh random order each time: Tollgate, Tollgate with ``Cache-Control:
   no-store`` (the response cache and single flight off) and vLLM's server. Prints engine
   tokens computed per token served (prompt tokens not served from the prefix cache, plus
   output tokens the engine generated, over every answer's prompt and output tokens),
   requests/s and p50 latency.
2. **Hit path.** One cached request, over ``--connections`` keep-alive connections from a
   raw-socket client, for ``--hit-seconds``: requests/s and p50 on Tollgate (every answer a
   hit; the event loop has one core) and on vLLM's server (every answer computed).
3. **Shared prefix.** 64 chat requests with one long system prompt and distinct questions
   (sampled, so no response cache): the share of prompt tokens the prefix cache served.
4. **Two-tenant flood.** A light tenant (pairs of short requests, six rounds) alone, then
   while a heavy one keeps 160 longer requests in flight (80 times the light one's): the
   light tenant's p50 on Tollgate with its default queue (128 slots), with the queue
   narrowed to 8 slots, and on vLLM's server.
5. **Engine time.** The sum of every Tollgate answer's ``gpu_ms`` over phases 1 to 3
   against the engine's busy time over them (printed before phase 4).

    .venv/bin/python bench/efficiency.py [--requests 2000] [--distinct 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import bench_servers, percentile  # noqa: E402 (bench/ is the script's folder)

from serving.demo import prepare_demo_models  # noqa: E402 (after the path is set)

servers = bench_servers()

MODEL = "demo-chat"
CONCURRENCY = 32
PAUSE_S = 1.5


@dataclass
class Tally:
    """What one mode's answers add up to."""

    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    served: int = 0
    computed: int = 0
    prompt: int = 0
    cached: int = 0
    gpu_ms: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)

    def add(self, latency: float, answer: httpx.Response) -> None:
        if answer.status_code != 200:
            raise SystemExit(f"answer {answer.status_code}: {answer.text[:300]}")
        self.latencies.append(latency)
        usage = answer.json()["usage"]
        details = usage.get("prompt_tokens_details") or {}
        cached = int(details.get("cached_tokens") or 0)
        prompt, completion = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
        status = answer.headers.get("x-tollgate-cache", "computed")
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.served += prompt + completion
        self.prompt += prompt
        self.cached += cached
        self.gpu_ms += float(usage.get("gpu_ms") or 0.0)
        if status not in ("hit", "shared"):
            self.computed += prompt - cached + completion

    def line(self, name: str) -> str:
        rps = len(self.latencies) / self.seconds if self.seconds else 0.0
        p50 = percentile(self.latencies, 0.5) * 1000
        ratio = self.computed / self.served if self.served else 0.0
        return (
            f"  {name:<22} computed/served {ratio:6.3f}   {rps:7.1f} req/s   p50 {p50:8.1f} ms"
            f"   {dict(sorted(self.statuses.items()))}"
        )


def zipf_prompts(requests: int, distinct: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    weights = [1 / (rank**1.1) for rank in range(1, distinct + 1)]
    prompts = [f"question {i}: tell me about item {i * 7919 % 1000}" for i in range(distinct)]
    return rng.choices(prompts, weights=weights, k=requests)


async def run_pool(
    jobs: list[Callable[[], Awaitable[None]]], concurrency: int = CONCURRENCY
) -> float:
    queue = list(reversed(jobs))
    began = time.perf_counter()

    async def worker() -> None:
        while queue:
            await queue.pop()()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - began


async def zipf_phase(
    targets: dict[str, tuple[str, dict[str, str]]], prompts: list[str], chunks: int
) -> dict[str, Tally]:
    tallies = {name: Tally() for name in targets}
    clients = {
        name: httpx.AsyncClient(
            base_url=url, headers=headers, timeout=300, limits=httpx.Limits(max_connections=64)
        )
        for name, (url, headers) in targets.items()
    }
    size = -(-len(prompts) // chunks)
    try:
        for start in range(0, len(prompts), size):
            chunk = prompts[start : start + size]
            order = list(targets)
            random.shuffle(order)
            for name in order:
                await asyncio.sleep(PAUSE_S)
                api, tally = clients[name], tallies[name]

                def job(prompt: str, api: httpx.AsyncClient = api, tally: Tally = tally) -> Any:
                    async def call() -> None:
                        body = {
                            "model": MODEL,
                            "prompt": prompt,
                            "max_tokens": 32,
                            "temperature": 0,
                            "ignore_eos": True,
                        }
                        began = time.perf_counter()
                        answer = await api.post("/v1/completions", json=body)
                        tally.add(time.perf_counter() - began, answer)

                    return call

                tally.seconds += await run_pool([job(p) for p in chunk])
    finally:
        for client in clients.values():
            await client.aclose()
    return tallies


async def hammer(
    base_url: str, headers: dict[str, str], body: dict[str, Any], seconds: float, connections: int
) -> tuple[float, float]:
    """(requests/s, p50 ms) of ``body`` sent back to back over raw keep-alive connections."""
    host, port = base_url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = [
        "POST /v1/completions HTTP/1.1",
        f"host: {host}",
        "content-type: application/json",
        f"content-length: {len(payload)}",
    ]
    head += [f"{k}: {v}" for k, v in headers.items()]
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + payload
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                writer.write(request)
                raw = await reader.readuntil(b"\r\n\r\n")
                status = raw[9:12]
                length = 0
                for line in raw.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                if status != b"200":
                    raise SystemExit(f"hit path answered {status.decode()}")
                latencies.append(time.perf_counter() - began)
        finally:
            writer.close()

    began = time.perf_counter()
    await asyncio.gather(*(connection() for _ in range(connections)))
    elapsed = time.perf_counter() - began
    return len(latencies) / elapsed, percentile(latencies, 0.5) * 1000


async def prefix_phase(url: str, headers: dict[str, str]) -> tuple[Tally, float]:
    """The tally of the 64 chats, and the gpu_ms of the first request that filled the cache."""
    system = " ".join(f"rule {i}: answer briefly and in plain words." for i in range(16))
    tally = Tally()
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as api:

        def job(i: int) -> Any:
            async def call() -> None:
                body = {
                    "model": MODEL,
                    "messages": [
                        {"role": "system", "content": system},
                        {"role": "user", "content": f"question number {i} about topic {i * 31}"},
                    ],
                    "max_tokens": 8,
                    "temperature": 0.7,
                }
                began = time.perf_counter()
                answer = await api.post("/v1/chat/completions", json=body)
                tally.add(time.perf_counter() - began, answer)

            return call

        await job(-1)()  # the system prompt is in the cache, as after any first request
        first_gpu_ms = tally.gpu_ms
        tally = Tally()
        tally.seconds = await run_pool([job(i) for i in range(64)], concurrency=8)
    return tally, first_gpu_ms


async def light_p50(url: str, light: dict[str, str], heavy: dict[str, str] | None) -> float:
    """The light tenant's p50, alone or under the heavy tenant's flood."""

    def body(tag: str, tokens: int) -> dict[str, Any]:
        return {
            "model": MODEL,
            "prompt": f"{tag} {random.random()}",
            "max_tokens": tokens,
            "temperature": 0.9,
            "ignore_eos": True,
        }

    async with (
        httpx.AsyncClient(base_url=url, headers=light, timeout=600) as api,
        httpx.AsyncClient(
            base_url=url,
            headers=heavy or light,
            timeout=600,
            limits=httpx.Limits(max_connections=400),
        ) as flood_api,
    ):
        done = asyncio.Event()

        async def flooder() -> None:
            while not done.is_set():
                (await flood_api.post("/v1/completions", json=body("flood", 64))).raise_for_status()

        # 160 requests in flight all along: 20 times the light tenant's 2 and longer ones.
        flood = [asyncio.create_task(flooder()) for _ in range(160 if heavy is not None else 0)]
        if flood:
            await asyncio.sleep(2.0)
        latencies = []
        for _ in range(6):

            async def one() -> float:
                began = time.perf_counter()
                answer = await api.post("/v1/completions", json=body("light", 32))
                answer.raise_for_status()
                return time.perf_counter() - began

            latencies += await asyncio.gather(one(), one())
        done.set()
        await asyncio.gather(*flood)
    return float(statistics.median(latencies)) * 1000


def busy_ms(url: str) -> float:
    return float(httpx.get(url + "/readyz", timeout=10).json()["models"][MODEL]["busy_ms"])


def wait_idle(url: str) -> None:
    for _ in range(600):
        stats = httpx.get(url + "/readyz", timeout=10).json()["models"][MODEL]
        if stats["running"] == 0 and stats["waiting"] == 0 and stats["admitted"] == 0:
            return
        time.sleep(0.1)
    raise SystemExit("the engine did not go idle")


async def main_async(args: argparse.Namespace) -> None:
    prepare_demo_models(ROOT / ".tollgate" / "models")
    with servers.servers({"tollgate", "vllm"}) as started:
        by_name = {s.name: s for s in started}
        tg, vllm = by_name["tollgate"], by_name["vllm"]
        token = tg.admin_token
        tg_headers = tg.headers
        wait_idle(tg.base_url)
        busy_before = busy_ms(tg.base_url)

        print(f"1. Zipf mix: {args.requests} requests over {args.distinct} prompts (s = 1.1)")
        prompts = zipf_prompts(args.requests, args.distinct)
        tallies = await zipf_phase(
            {
                "tollgate": (tg.base_url, tg_headers),
                "tollgate, no-store": (tg.base_url, {**tg_headers, "cache-control": "no-store"}),
                "vllm": (vllm.base_url, {}),
            },
            prompts,
            chunks=4,
        )
        for name, tally in tallies.items():
            print(tally.line(name))
        gpu_ms = tallies["tollgate"].gpu_ms + tallies["tollgate, no-store"].gpu_ms

        print(
            f"2. Hit path: one cached request, {args.connections} connections, "
            f"{args.hit_seconds:.0f} s each"
        )
        hot = {
            "model": MODEL,
            "prompt": prompts[0],
            "max_tokens": 32,
            "temperature": 0,
            "ignore_eos": True,
        }
        for name, url, headers in (
            ("tollgate (hits)", tg.base_url, tg_headers),
            ("vllm (computed)", vllm.base_url, {}),
        ):
            await asyncio.sleep(PAUSE_S)
            rps, p50 = await hammer(url, headers, hot, args.hit_seconds, args.connections)
            print(f"  {name:<22} {rps:8.1f} req/s   p50 {p50:7.2f} ms")

        print("3. Shared prefix: 64 chats, one long system prompt")
        for name, url, headers in (
            ("tollgate", tg.base_url, tg_headers),
            ("vllm", vllm.base_url, {}),
        ):
            await asyncio.sleep(PAUSE_S)
            tally, first = await prefix_phase(url, headers)
            if name == "tollgate":
                gpu_ms += tally.gpu_ms + first
            share = tally.cached / tally.prompt if tally.prompt else 0.0
            print(f"  {name:<22} prompt tokens from the prefix cache {share:6.1%}")

        wait_idle(tg.base_url)
        busy = busy_ms(tg.base_url) - busy_before
        error = abs(gpu_ms - busy) / busy if busy else 0.0
        print(
            f"5. Engine time over phases 1 to 3: sum of gpu_ms {gpu_ms:,.0f} ms, engine busy "
            f"{busy:,.0f} ms: error {error:.2%}"
        )

        print("4. Two tenants: a light one's p50, alone and under a flood")
        light_key = servers.tenant_key(tg, token, None)
        heavy_key = servers.tenant_key(tg, token, None)
        light = {"authorization": f"Bearer {light_key}"}
        heavy = {"authorization": f"Bearer {heavy_key}"}
        admin = httpx.AsyncClient(
            base_url=tg.base_url + "/admin/v1",
            headers={"authorization": f"Bearer {token}"},
            timeout=30,
        )
        rows = []
        for label, slots in (("default queue", None), ("8 slots", 8)):
            policy = {"models": {MODEL: {"slots": slots}} if slots else None}
            (await admin.patch("/serving", json=policy)).raise_for_status()
            await asyncio.sleep(PAUSE_S)
            alone = await light_p50(tg.base_url, light, None)
            loaded = await light_p50(tg.base_url, light, heavy)
            rows.append((f"tollgate, {label}", alone, loaded))
        (await admin.patch("/serving", json={"models": None})).raise_for_status()
        await asyncio.sleep(PAUSE_S)
        alone = await light_p50(vllm.base_url, {}, None)
        loaded = await light_p50(vllm.base_url, {}, {})
        rows.append(("vllm", alone, loaded))
        for name, alone, loaded in rows:
            print(
                f"  {name:<22} alone {alone:8.1f} ms   flooded {loaded:8.1f} ms"
                f"   x{loaded / alone:.2f}"
            )
        await admin.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--distinct", type=int, default=200)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--hit-seconds", type=float, default=5.0)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
