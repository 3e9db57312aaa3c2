"""Gateways without engines in front of two workers, against two vLLM servers behind a
round-robin balancer (what a user would otherwise run for two devices).

Starts on one machine, on the same model (``demo-chat``) and engine sizes:

- two ``tollgate worker`` processes (one engine each), registered in Redis;
- two ``tollgate serve`` gateways with ``TOLLGATE_ENGINES=workers`` (prefix affinity), and a
  third routing round-robin (the baseline of the prefix-hit comparison), sharing one
  PostgreSQL database and one Redis;
- two vLLM OpenAI servers (``python -m vllm.entrypoints.openai.api_server``), which the
  client balances round-robin.

Then, in rounds visiting the set-ups in a fresh random order each time:

1. **Throughput and TTFT**: ``--requests`` streamed chat completions, ``--concurrency`` at a
   time, distinct prompts, through one gateway, through two (alternating), and through the
   two vLLM servers: requests per second, TTFT p50 and p99.
2. **Prefix hits**: eight conversations of six turns sharing a system prompt, each opening
   on a document of its own, all at once; the cached share of prompt tokens with affinity,
   with round-robin (Tollgate's third gateway) and on the vLLM pair.

The workers' KV caches are small (``--kv-cache-gb``), as a device's cache is under real
load: a worker holds about half of the conversations, not all of them.

    .venv/bin/python bench/scale.py [--requests 200] [--concurrency 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import free_port, percentile, postgres_url, redis_url  # noqa: E402 (bench/ is the script's folder)

from serving.demo import prepare_demo_models  # noqa: E402

MODEL = "demo-chat"
MAX_MODEL_LEN = 4096
START_TIMEOUT_S = 600


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    ready_path: str = "/readyz"
    headers: dict[str, str] = field(default_factory=dict)


def models_file(folder: Path, kv_cache_gb: float) -> Path:
    path = folder / "models.toml"
    path.write_text(
        f"""
[[models]]
name = "{MODEL}"
source = "{ROOT / ".tollgate" / "models" / MODEL}"
kind = "chat"

[models.engine]
max_model_len = {MAX_MODEL_LEN}
dtype = "float32"
kv_cache_gb = {kv_cache_gb}
max_num_seqs = 64
"""
    )
    return path


def spawn(name: str, args: list[str], env: dict[str, str], folder: Path) -> tuple[Path, Any]:
    log = folder / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return log, process


def wait_ready(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if server.process.poll() is not None:
            raise SystemExit(f"{server.name} exited:\n{server.log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(server.url + server.ready_path, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"{server.name} not ready after {START_TIMEOUT_S} s")
        time.sleep(0.5)


def stop(server: Server) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)


def tenant_key(gateway: Server, token: str) -> str:
    limits = {"rpm": 10**9, "tpm": 10**12, "max_concurrency": 10**6}
    with httpx.Client(
        base_url=gateway.url + "/admin/v1", headers={"authorization": f"Bearer {token}"}
    ) as admin:
        tenant = admin.post("/tenants", json={"name": "bench"}).json()["id"]
        admin.put(f"/tenants/{tenant}/quota", json=limits).raise_for_status()
        issued = admin.post(f"/tenants/{tenant}/keys", json={"name": "bench"})
        issued.raise_for_status()
        return str(issued.json()["value"])


@contextlib.contextmanager
def fleet(folder: Path, kv_cache_gb: float) -> Iterator[dict[str, list[Server]]]:
    prepare_demo_models(ROOT / ".tollgate" / "models")
    models = models_file(folder, kv_cache_gb)
    token = "tga_" + secrets.token_urlsafe(24)
    with postgres_url() as database, redis_url() as redis:
        base = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("TOLLGATE_", "OTEL_"))},
            "TOLLGATE_DATA_DIR": str(ROOT / ".tollgate"),
            "TOLLGATE_DATABASE_URL": database,
            "TOLLGATE_REDIS_URL": redis,
            "TOLLGATE_ADMIN_TOKEN": token,
            "TOLLGATE_SECRET": secrets.token_urlsafe(32),
            "TOLLGATE_DEPLOYMENT": f"bench-{secrets.token_hex(3)}",
            "TOLLGATE_LOG_LEVEL": "WARNING",
            "HF_HUB_OFFLINE": "1",
        }
        started: dict[str, list[Server]] = {"workers": [], "tollgate": [], "rr": [], "vllm": []}
        try:
            for i in (1, 2):
                port = free_port()
                env = {**base, "TOLLGATE_WORKER_ID": f"w{i}", "TOLLGATE_ENGINE_LOG": "-"}
                args = [sys.executable, "-m", "gateway", "worker", "--port", str(port)]
                log, process = spawn(f"worker-{i}", [*args, "--models", str(models)], env, folder)
                started["workers"].append(Server(f"w{i}", f"http://127.0.0.1:{port}", process, log))
            for name in ("gateway-1", "gateway-2", "gateway-rr"):
                port = free_port()
                env = {**base, "TOLLGATE_ENGINES": "workers", "TOLLGATE_MIGRATE": "false"}
                if name == "gateway-rr":
                    env["TOLLGATE_ROUTING"] = "round_robin"
                args = [sys.executable, "-m", "gateway", "serve", "--port", str(port)]
                log, process = spawn(name, args, env, folder)
                server = Server(name, f"http://127.0.0.1:{port}", process, log)
                started["rr" if name == "gateway-rr" else "tollgate"].append(server)
            for i in (1, 2):
                port = free_port()
                args = [
                    sys.executable,
                    "-m",
                    "vllm.entrypoints.openai.api_server",
                    "--model",
                    str(ROOT / ".tollgate" / "models" / MODEL),
                    "--served-model-name",
                    MODEL,
                    "--port",
                    str(port),
                    "--max-model-len",
                    str(MAX_MODEL_LEN),
                    "--dtype",
                    "float32",
                    "--kv-cache-memory-bytes",
                    str(int(kv_cache_gb * (1 << 30))),
                    "--max-num-seqs",
                    "64",
                    "--enable-prompt-tokens-details",
                ]
                log, process = spawn(f"vllm-{i}", args, dict(base), folder)
                server = Server(f"vllm-{i}", f"http://127.0.0.1:{port}", process, log, "/health")
                started["vllm"].append(server)
            for servers in started.values():
                for server in servers:
                    wait_ready(server)
            deadline = time.monotonic() + 60
            for gw in [*started["tollgate"], *started["rr"]]:
                while (
                    not httpx.get(gw.url + "/readyz").json()["models"].get(MODEL, {}).get("ready")
                ):
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{gw.name} sees no worker serving {MODEL}")
                    time.sleep(0.3)
            key = tenant_key(started["tollgate"][0], token)
            for gw in [*started["tollgate"], *started["rr"]]:
                gw.headers = {"authorization": f"Bearer {key}"}
            yield started
        finally:
            for servers in started.values():
                for server in servers:
                    stop(server)


async def stream_once(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], messages: list[dict[str, str]]
) -> tuple[float, int, int, str]:
    """TTFT (s), prompt tokens, cached tokens and the answer's text of one streamed chat."""
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": 24,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    started = time.perf_counter()
    ttft = None
    text, prompt, cached = [], 0, 0
    async with client.stream(
        "POST", url + "/v1/chat/completions", json=body, headers=headers
    ) as answer:
        answer.raise_for_status()
        async for line in answer.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                content = choice.get("delta", {}).get("content")
                if content:
                    if ttft is None:
                        ttft = time.perf_counter() - started
                    text.append(content)
            usage = chunk.get("usage")
            if usage:
                prompt = usage["prompt_tokens"]
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return ttft or time.perf_counter() - started, prompt, cached, "".join(text)


async def throughput(
    targets: list[Server], requests: int, concurrency: int, seed: int
) -> tuple[float, list[float]]:
    rng = random.Random(seed)
    cycle = itertools.cycle(targets)
    jobs = [
        (next(cycle), [{"role": "user", "content": f"{rng.random()} " * 12}])
        for _ in range(requests)
    ]
    ttfts: list[float] = []
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(
        timeout=300, limits=httpx.Limits(max_connections=concurrency * 2)
    ) as client:

        async def one(target: Server, messages: list[dict[str, str]]) -> None:
            async with gate:
                ttft, *_ = await stream_once(client, target.url, target.headers, messages)
                ttfts.append(ttft)

        began = time.perf_counter()
        await asyncio.gather(*(one(t, m) for t, m in jobs))
        elapsed = time.perf_counter() - began
    return requests / elapsed, ttfts


async def conversations(targets: list[Server], seed: int) -> float:
    """Eight conversations sharing a system prompt, all at once: the cached share."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta omega sigma kappa lambda theta zeta".split()  # noqa: SIM905

    def text(n: int) -> str:
        return " ".join(rng.choice(words) + str(rng.randrange(100)) for _ in range(n))

    system = text(46)
    users = [[text(145)] + [text(15) for _ in range(5)] for _ in range(8)]
    cycle = itertools.cycle(targets)
    totals = [0, 0]
    async with httpx.AsyncClient(timeout=300) as client:

        async def run(c: int) -> None:
            messages = [{"role": "system", "content": system}]
            for user in users[c]:
                messages.append({"role": "user", "content": user})
                target = next(cycle)  # one gateway, or the client's round-robin over vLLM
                _, prompt, cached, answer = await stream_once(
                    client, target.url, target.headers, messages
                )
                totals[0] += prompt
                totals[1] += cached
                messages.append({"role": "assistant", "content": answer})

        await asyncio.gather(*(run(c) for c in range(8)))
    return totals[1] / totals[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kv-cache-gb", type=float, default=0.011)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="tollgate-scale-"))
    with fleet(folder, args.kv_cache_gb) as servers:
        setups = {
            "tollgate, 1 gateway": servers["tollgate"][:1],
            "tollgate, 2 gateways": servers["tollgate"],
            "vllm x2, round-robin": servers["vllm"],
        }
        caches = {
            "affinity": servers["tollgate"][:1],
            "round-robin": servers["rr"],
            "vllm x2, round-robin": servers["vllm"],
        }
        rates: dict[str, list[float]] = {name: [] for name in setups}
        ttfts: dict[str, list[float]] = {name: [] for name in setups}
        shares: dict[str, list[float]] = {name: [] for name in caches}
        for r in range(args.rounds):
            order = list(setups)
            random.shuffle(order)
            for name in order:
                rate, samples = asyncio.run(
                    throughput(setups[name], args.requests, args.concurrency, seed=r)
                )
                rates[name].append(rate)
                ttfts[name].extend(samples)
            order = list(caches)
            random.shuffle(order)
            for name in order:
                shares[name].append(asyncio.run(conversations(caches[name], seed=100 + r)))
            print(f"round {r + 1} of {args.rounds} done", file=sys.stderr)
    print(
        f"Throughput: {args.requests} streamed chats per round, {args.concurrency} at a time, "
        f"{args.rounds} rounds (medians)"
    )
    print(f"{'set-up':<24} {'req/s':>8} {'TTFT p50':>10} {'TTFT p99':>10}")
    for name in setups:
        print(
            f"{name:<24} {statistics.median(rates[name]):>8.1f} "
            f"{percentile(ttfts[name], 0.5) * 1000:>8.1f} ms "
            f"{percentile(ttfts[name], 0.99) * 1000:>8.1f} ms"
        )
    one, two = (statistics.median(rates[n]) for n in list(setups)[:2])
    vllm = statistics.median(rates["vllm x2, round-robin"])
    print(f"two gateways / one: {two / one:.2f}x; two gateways / vLLM pair: {two / vllm:.2f}x")
    print("Prefix cache: cached share of prompt tokens, 8 conversations x 6 turns (medians)")
    for name in caches:
        print(f"{name:<24} {statistics.median(shares[name]):>8.3f}")
    ratio = statistics.median(shares["affinity"]) / statistics.median(shares["round-robin"])
    print(f"affinity / round-robin: {ratio:.2f}x")


if __name__ == "__main__":
    main()
