"""Streams through the gateway against the same streams straight at vLLM's AsyncLLM.

Drives N concurrent streams at the same prompts twice, first in-process at the engine, then
over HTTP through a `tollgate serve` process, and prints output tokens/s, time to first token
p50 and p99, and the gateway/direct ratios. Each mode runs a warm-up round, then ROUNDS
measured rounds; the figures are medians over rounds.

    .venv/bin/python bench/serving.py [--streams 64] [--max-tokens 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = "demo-chat"


@dataclass
class Round:
    tokens: int
    seconds: float
    ttfts: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def prompts(n: int) -> list[str]:
    return [f"Request {i}: tell the quick gateway about the shared prefix." for i in range(n)]


def catalog_file(data_dir: Path, stream_interval: int) -> Path:
    text = f"""
[[models]]
name = "{MODEL}"
source = "{data_dir / "models" / MODEL}"
kind = "chat"

[models.engine]
max_model_len = 2048
dtype = "float32"
kv_cache_gb = 1.0
max_num_seqs = 128
stream_interval = {stream_interval}
"""
    path = Path(tempfile.mkdtemp()) / "bench-models.toml"
    path.write_text(text)
    return path


async def direct(
    catalog: Path, data_dir: Path, streams: int, max_tokens: int, rounds: int
) -> list[Round]:
    """Drive vLLM's AsyncLLM itself, with the engine arguments the gateway would use."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    from serving import load_catalog
    from serving.vllm_engine import VllmGenerationEngine, configure_cpu_binding

    spec = load_catalog(catalog, data_dir).get(MODEL)
    assert spec is not None
    # Started as the gateway starts it (same arguments, same CPU placement), then driven
    # through vLLM's own AsyncLLM API with nothing of Tollgate in between.
    engine = VllmGenerationEngine(spec, configure_cpu_binding())
    await engine.start()
    llm = engine._llm
    assert llm is not None
    tokenizer = llm.get_tokenizer()
    texts = prompts(streams)

    def render(i: int) -> list[int]:
        # Inside the timed region: a caller of the engine renders and tokenizes too.
        chat = [{"role": "user", "content": texts[i]}]
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        return list(tokenizer.encode(text, add_special_tokens=False))

    params = SamplingParams(
        max_tokens=max_tokens,
        ignore_eos=True,
        output_kind=RequestOutputKind.DELTA,
        skip_special_tokens=True,
    )

    async def one(tag: str, i: int, start: float) -> tuple[int, float]:
        first = None
        count = 0
        async for out in llm.generate(
            TokensPrompt(prompt_token_ids=render(i)), params, f"{tag}-{i}"
        ):
            if first is None and out.outputs[0].token_ids:
                first = time.perf_counter() - start
            count += len(out.outputs[0].token_ids)
        return count, first or 0.0

    results = []
    try:
        for r in range(rounds + 1):
            start = time.perf_counter()
            done = await asyncio.gather(*(one(f"r{r}", i, start) for i in range(streams)))
            elapsed = time.perf_counter() - start
            if r:  # round 0 warms up
                results.append(Round(sum(c for c, _ in done), elapsed, [t for _, t in done]))
    finally:
        await engine.shutdown()
    return results


def through_gateway(base_url: str, streams: int, max_tokens: int, rounds: int) -> list[Round]:
    """Drive the gateway with curl's parallel transfers: a C client, so the load generator
    takes little of the CPU the gateway and the engine share. With the first token leaving
    together with the response headers, curl's time to first byte is the time to first token.
    """
    work = Path(tempfile.mkdtemp())
    lines = ["parallel", f"parallel-max = {streams}", "parallel-immediate", "silent"]
    for i, text in enumerate(prompts(streams)):
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        (work / f"body{i}.json").write_text(json.dumps(body))
        lines += [
            f'url = "{base_url}/v1/chat/completions"',
            'header = "content-type: application/json"',
            f'data-binary = "@{work / f"body{i}.json"}"',
            f'output = "{work / f"out{i}.txt"}"',
            'write-out = "%{time_starttransfer}\\n"',
            "next",
        ]
    config = work / "curl.cfg"
    config.write_text("\n".join(lines[:-1]) + "\n")
    results = []
    for r in range(rounds + 1):
        start = time.perf_counter()
        done = subprocess.run(
            [CURL, "--config", str(config)], capture_output=True, text=True, check=True
        )
        elapsed = time.perf_counter() - start
        ttfts = [float(x) for x in done.stdout.split()]
        tokens = 0
        for i in range(streams):
            found = USAGE.search((work / f"out{i}.txt").read_bytes())
            tokens += int(found.group(1)) if found else 0
        if r:
            results.append(Round(tokens, elapsed, ttfts))
    return results


CURL = shutil.which("curl") or "curl"
USAGE = re.compile(rb'"usage":\{"prompt_tokens":\d+,"completion_tokens":(\d+)')


def start_gateway(catalog: Path, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TOLLGATE_DATA_DIR": str(data_dir), "TOLLGATE_LOG_LEVEL": "WARNING"}
    for key in [k for k in env if k.startswith("OTEL_")]:
        del env[key]
    log = open(Path(tempfile.mkdtemp()) / "gateway.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--models", str(catalog)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"gateway exited; see {log.name}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("gateway did not become ready")
        time.sleep(0.5)


def summary(name: str, rounds: list[Round]) -> tuple[float, float, float]:
    tps = statistics.median(r.tokens_per_s for r in rounds)
    ttfts = [t for r in rounds for t in r.ttfts]
    p50, p99 = percentile(ttfts, 0.5) * 1000, percentile(ttfts, 0.99) * 1000
    each = ", ".join(f"{r.tokens_per_s:,.0f}" for r in rounds)
    print(
        f"{name:<8} output tokens/s {tps:>8,.0f} (rounds: {each})   "
        f"TTFT p50 {p50:7.1f} ms   p99 {p99:7.1f} ms"
    )
    return tps, p50, p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stream-interval", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".tollgate")
    args = parser.parse_args()

    from serving.demo import prepare_demo_models

    prepare_demo_models(args.data_dir / "models")
    catalog = catalog_file(args.data_dir.resolve(), args.stream_interval)
    print(
        f"{args.streams} concurrent streams x {args.max_tokens} output tokens, "
        f"{args.rounds} rounds + warm-up, model {MODEL}, stream_interval {args.stream_interval}"
    )

    import uvloop

    # uvloop, as the gateway runs on it.
    direct_rounds = uvloop.run(
        direct(catalog, args.data_dir, args.streams, args.max_tokens, args.rounds)
    )
    proc, url = start_gateway(catalog, args.data_dir)
    try:
        gateway_rounds = through_gateway(url, args.streams, args.max_tokens, args.rounds)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

    d_tps, d_p50, d_p99 = summary("direct", direct_rounds)
    g_tps, g_p50, g_p99 = summary("gateway", gateway_rounds)
    print(
        f"ratio    tokens/s gateway/direct {g_tps / d_tps:.3f}   "
        f"TTFT p50 {g_p50 - d_p50:+.1f} ms   p99 {g_p99 - d_p99:+.1f} ms (gateway - direct)"
    )


if __name__ == "__main__":
    main()
