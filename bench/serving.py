"""Streams through the gateway against vLLM's own server and straight at vLLM's AsyncLLM.

Drives N concurrent streams at the same prompts three ways: straight at an AsyncLLM engine
in a child process (started as the gateway starts its engine), over HTTP through vLLM's own
OpenAI server (``python -m vllm.entrypoints.openai.api_server``, its defaults), and over HTTP
through a `tollgate serve` process; both HTTP modes are driven by curl. Rounds alternate
between the modes so that drift in the machine hits all alike. Prints output tokens/s
(median over rounds), time to first token p50 and p99 (over all streams of all rounds), and
the gateway's ratios to vLLM's server and to the direct engine.

    .venv/bin/python bench/serving.py [--streams 64] [--max-tokens 256] [--rounds 10]
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

from _common import percentile  # noqa: E402 (bench/ is the script's folder)

MODEL = "demo-chat"


@dataclass
class Round:
    tokens: int
    seconds: float
    ttfts: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


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


async def direct_child(catalog: Path, data_dir: Path, streams: int, max_tokens: int) -> None:
    """Serve rounds straight at vLLM's AsyncLLM, one per ``round`` line on stdin.

    The engine is started exactly as the gateway starts it (same arguments, same CPU
    placement), then driven through vLLM's own API with nothing of Tollgate in between.
    Each round prints one JSON line: tokens, seconds, time to first token per stream.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    from serving import load_catalog
    from serving.host import settle_process
    from serving.vllm_engine import (
        VllmGenerationEngine,
        configure_cpu_binding,
        pin_engine_processes,
    )

    spec = load_catalog(catalog, data_dir).get(MODEL)
    assert spec is not None
    cpus = configure_cpu_binding()
    engine = VllmGenerationEngine(spec, cpus)
    await engine.start()
    pin_engine_processes(cpus)
    settle_process()  # as vLLM's own server and Tollgate's engine host do after start
    llm = engine._llm
    assert llm is not None
    texts = prompts(streams)
    params = SamplingParams(
        max_tokens=max_tokens,
        ignore_eos=True,
        output_kind=RequestOutputKind.DELTA,
        skip_special_tokens=True,
    )

    async def one(tag: str, i: int, start: float) -> tuple[int, float]:
        # Rendering and tokenizing stay inside the timed region: a caller does them too.
        prompt = TokensPrompt(prompt_token_ids=engine.render_chat([("user", texts[i])]))
        first = None
        count = 0
        async for out in llm.generate(prompt, params, f"{tag}-{i}"):
            if first is None and out.outputs[0].token_ids:
                first = time.perf_counter() - start
            count += len(out.outputs[0].token_ids)
        return count, first or 0.0

    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    r = 0
    try:
        while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "round":
            r += 1
            start = time.perf_counter()
            done = await asyncio.gather(*(one(f"r{r}", i, start) for i in range(streams)))
            elapsed = time.perf_counter() - start
            result = {"tokens": sum(c for c, _ in done), "seconds": elapsed}
            print(json.dumps({**result, "ttfts": [t for _, t in done]}), flush=True)
    finally:
        await engine.shutdown()


class Direct:
    """The direct-mode child process, driven one round at a time."""

    def __init__(self, catalog: Path, data_dir: Path, streams: int, max_tokens: int) -> None:
        args = [sys.executable, __file__, "--direct-child", "--catalog", str(catalog)]
        args += ["--data-dir", str(data_dir), "--streams", str(streams)]
        args += ["--max-tokens", str(max_tokens)]
        self.log = Path(tempfile.mkdtemp()) / "direct.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
            )
        if self._line() != "ready":
            raise SystemExit(f"direct engine did not start; see {self.log}")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        while line := self.proc.stdout.readline():
            if line.startswith(("ready", "{")):
                return line.strip()
        raise SystemExit(f"direct engine exited; see {self.log}")

    def round(self) -> Round:
        assert self.proc.stdin is not None
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        data = json.loads(self._line())
        return Round(data["tokens"], data["seconds"], data["ttfts"])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


class Gateway:
    """Rounds through the gateway with curl's parallel transfers.

    curl is a C client, so the load generator takes little of the CPU that the gateway and
    the engine share; with the first token leaving together with the response headers,
    curl's time to first byte is the time to first token.
    """

    def __init__(self, base_url: str, streams: int, max_tokens: int) -> None:
        self.work = Path(tempfile.mkdtemp())
        self.streams = streams
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
            (self.work / f"body{i}.json").write_text(json.dumps(body))
            lines += [
                f'url = "{base_url}/v1/chat/completions"',
                'header = "content-type: application/json"',
                f'data-binary = "@{self.work / f"body{i}.json"}"',
                f'output = "{self.work / f"out{i}.txt"}"',
                'write-out = "%{time_starttransfer}\\n"',
                "next",
            ]
        self.config = self.work / "curl.cfg"
        self.config.write_text("\n".join(lines[:-1]) + "\n")

    def round(self) -> Round:
        start = time.perf_counter()
        done = subprocess.run(
            [CURL, "--config", str(self.config)], capture_output=True, text=True, check=True
        )
        elapsed = time.perf_counter() - start
        tokens = 0
        for i in range(self.streams):
            found = USAGE.search((self.work / f"out{i}.txt").read_bytes())
            tokens += int(found.group(1)) if found else 0
        return Round(tokens, elapsed, [float(x) for x in done.stdout.split()])


CURL = shutil.which("curl") or "curl"
#: The final usage chunk's output tokens (vLLM's server writes its fields in another order).
USAGE = re.compile(rb'"usage":\{[^}]*"completion_tokens":(\d+)')


def start_gateway(catalog: Path, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "TOLLGATE_DATA_DIR": str(data_dir),
        "TOLLGATE_LOG_LEVEL": "WARNING",
        "TOLLGATE_AUTH": "false",  # the bare serving path; bench/gateway.py measures auth
    }
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


def start_vllm_server(data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """vLLM's own OpenAI server on the same model and engine sizes, as a user would start it
    (its defaults otherwise); its engine computes on the same core as the gateway's."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cores = sorted(os.sched_getaffinity(0))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": str(cores[-1])}
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    args += ["--model", str(data_dir / "models" / MODEL), "--served-model-name", MODEL]
    args += ["--port", str(port), "--max-model-len", "2048", "--dtype", "float32"]
    args += ["--kv-cache-memory-bytes", str(1 << 30), "--max-num-seqs", "128"]
    log = open(Path(tempfile.mkdtemp()) / "vllm.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM's server exited; see {log.name}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("vLLM's server did not become ready")
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
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--stream-interval", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=ROOT / ".tollgate")
    parser.add_argument("--direct-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--catalog", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.direct_child:
        import uvloop  # the gateway runs on uvloop too

        uvloop.run(direct_child(args.catalog, args.data_dir, args.streams, args.max_tokens))
        return

    from serving.demo import prepare_demo_models

    prepare_demo_models(args.data_dir / "models")
    catalog = catalog_file(args.data_dir.resolve(), args.stream_interval)
    print(
        f"{args.streams} concurrent streams x {args.max_tokens} output tokens, "
        f"{args.rounds} rounds of each mode, interleaved, after a warm-up round; "
        f"model {MODEL}, stream_interval {args.stream_interval}",
        flush=True,
    )
    direct = Direct(catalog, args.data_dir, args.streams, args.max_tokens)
    proc, url = start_gateway(catalog, args.data_dir)
    server, server_url = start_vllm_server(args.data_dir.resolve())
    modes: dict[str, Direct | Gateway] = {
        "direct": direct,
        "vllm": Gateway(server_url, args.streams, args.max_tokens),
        "gateway": Gateway(url, args.streams, args.max_tokens),
    }
    results: dict[str, list[Round]] = {name: [] for name in modes}
    try:
        for r in range(args.rounds + 1):
            for name, mode in modes.items():
                result = mode.round()
                if r:  # round 0 warms them up
                    results[name].append(result)
                # Let the idle engine stop busy-polling before the other one runs.
                time.sleep(IDLE_S)
    finally:
        direct.close()
        for process in (proc, server):
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)

    d_tps, d_p50, d_p99 = summary("direct", results["direct"])
    v_tps, v_p50, v_p99 = summary("vllm", results["vllm"])
    g_tps, g_p50, g_p99 = summary("gateway", results["gateway"])
    print(
        f"ratio    tokens/s gateway/vllm {g_tps / v_tps:.3f}   "
        f"TTFT p50 {g_p50 - v_p50:+.1f} ms   p99 {g_p99 - v_p99:+.1f} ms (gateway - vllm)"
    )
    print(
        f"ratio    tokens/s gateway/direct {g_tps / d_tps:.3f}   "
        f"TTFT p50 {g_p50 - d_p50:+.1f} ms   p99 {g_p99 - d_p99:+.1f} ms (gateway - direct)"
    )


IDLE_S = 1.5  # vLLM's workers busy-poll for 1 s after their last message

if __name__ == "__main__":
    main()
