"""What keys, quotas and billing add to a request, against vLLM's own OpenAI server.

Starts, on the same model (``demo-chat``, the same engine sizes):

- ``vllm``: vLLM's own server, ``python -m vllm.entrypoints.openai.api_server``;
- ``tollgate``: ``tollgate serve`` on the embedded default (SQLite, the in-process quota
  store), called with a tenant's key that has no limits (keys and billing on: every answer
  writes its usage event before it ends);
- ``tollgate-redis``: ``tollgate serve`` with quotas and the usage outbox on Redis, called
  with a key whose tenant has limits (admission and settlement run Redis scripts; the
  settlement and the usage event travel in one round trip);
- ``tollgate-noauth``: ``tollgate serve`` with ``TOLLGATE_AUTH=false`` (the bare path).

Then sends minimal completions (``max_tokens`` 1) one at a time, each server over its own
keep-alive connection, in blocks of ``--block`` requests; each round visits the servers in a
fresh random order, so that drift in the machine hits all of them alike. Prints per server
p50, p90 and p99 latency, and what each Tollgate adds to vLLM's server: the difference of
the p50s and of the p99s, and the median of the paired differences (the i-th request of a
server against vLLM's i-th).

The servers share the machine, so the run keeps them out of each other's way: vLLM binds
its engine's OpenMP threads to cores, and both servers get the same core for them (the
last one; ``VLLM_CPU_OMP_THREADS_BIND`` for vLLM's server, as Tollgate sets it for its own
engines), so that no engine computes on the core the HTTP front ends run on. And vLLM's
engine workers busy-wait (``sched_yield``) for a second after each step on its shared-memory
queue: a block starts ``--pause`` seconds after the previous one, when the other servers'
workers sleep again, and its first requests (the engine waking up) are not counted. Each
server is then measured as it runs alone, the rest of the machine idle.

    .venv/bin/python bench/gateway.py [--requests 2000] [--only vllm,tollgate]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import free_port, percentile, redis_url  # noqa: E402 (bench/ is the script's folder)

from serving.demo import prepare_demo_models  # noqa: E402 (after the path is set)

MODEL = "demo-chat"
MAX_MODEL_LEN = 512
KV_CACHE_GB = 0.25
BODY = {"model": MODEL, "prompt": "hello", "max_tokens": 1}
LIMITS = {
    "rpm": 10**9,
    "tpm": 10**12,
    "max_concurrency": 10**6,
    "daily_tokens": 10**12,
    "monthly_tokens": 10**12,
}
START_TIMEOUT_S = 900
#: Requests at the start of each block that are not counted (the engine waking up).
BLOCK_WARMUP = 2


@dataclass
class Server:
    name: str
    base_url: str
    process: subprocess.Popen[bytes]
    log: Path
    headers: dict[str, str] = field(default_factory=dict)
    ready_path: str = "/readyz"
    #: Tollgate's admin token.
    admin_token: str = ""


def catalog(data_dir: Path) -> Path:
    path = data_dir / "bench-models.toml"
    path.write_text(
        f"""
[[models]]
name = "{MODEL}"
source = "{ROOT / ".tollgate" / "models" / MODEL}"
kind = "chat"

[models.engine]
max_model_len = {MAX_MODEL_LEN}
dtype = "float32"
kv_cache_gb = {KV_CACHE_GB}
max_num_seqs = 128
"""
    )
    return path


def start_vllm(folder: Path, engine_core: str) -> Server:
    port = free_port()
    log = folder / "vllm.log"
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
        str(int(KV_CACHE_GB * (1 << 30))),
        "--max-num-seqs",
        "128",
        # Usage with cached prompt tokens, as Tollgate reports them.
        "--enable-prompt-tokens-details",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": engine_core}
    with log.open("wb") as out:
        process = subprocess.Popen(
            args, env=env, cwd=folder, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server("vllm", f"http://127.0.0.1:{port}", process, log, ready_path="/health")


def start_tollgate(name: str, folder: Path, **env: str) -> tuple[Server, str]:
    data = folder / name
    data.mkdir()
    (data / "models").symlink_to(ROOT / ".tollgate" / "models")
    token = "tga_" + secrets.token_urlsafe(24)
    port = free_port()
    log = data / "gateway.log"
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("TOLLGATE_", "OTEL_"))},
        "TOLLGATE_DATA_DIR": str(data),
        "TOLLGATE_ADMIN_TOKEN": token,
        "TOLLGATE_LOG_LEVEL": "WARNING",
        **env,
    }
    args = [sys.executable, "-m", "gateway", "serve", "--port", str(port)]
    args += ["--models", str(catalog(data))]
    with log.open("wb") as out:
        process = subprocess.Popen(
            args,
            env=full_env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(name, f"http://127.0.0.1:{port}", process, log), token


def wait_ready(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if server.process.poll() is not None:
            raise SystemExit(f"{server.name} exited:\n{server.log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(server.base_url + server.ready_path, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"{server.name} not ready after {START_TIMEOUT_S} s")
        time.sleep(0.5)


def tenant_key(server: Server, token: str, limits: dict[str, int] | None) -> str:
    with httpx.Client(
        base_url=server.base_url + "/admin/v1",
        headers={"authorization": f"Bearer {token}"},
        timeout=30,
    ) as admin:
        tenant = admin.post("/tenants", json={"name": "bench"}).json()["id"]
        if limits:
            admin.put(f"/tenants/{tenant}/quota", json=limits).raise_for_status()
        issued = admin.post(f"/tenants/{tenant}/keys", json={"name": "bench"})
        issued.raise_for_status()
        return str(issued.json()["value"])


def stop(server: Server) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()


@contextlib.contextmanager
def servers(only: set[str]) -> Iterator[list[Server]]:
    folder = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    cores = sorted(os.sched_getaffinity(0))
    engine_core = str(cores[-1])
    started: list[Server] = []
    try:
        with redis_url() as redis:
            keys: dict[str, tuple[str, dict[str, int] | None]] = {}
            if "tollgate" in only:
                server, token = start_tollgate("tollgate", folder)
                started.append(server)
                keys[server.name] = (token, None)
            if "tollgate-redis" in only:
                server, token = start_tollgate("tollgate-redis", folder, TOLLGATE_REDIS_URL=redis)
                started.append(server)
                keys[server.name] = (token, LIMITS)
            if "tollgate-noauth" in only:
                server, _ = start_tollgate("tollgate-noauth", folder, TOLLGATE_AUTH="false")
                started.append(server)
            if "vllm" in only:
                started.append(start_vllm(folder, engine_core))
            for server in started:
                wait_ready(server)
                if server.name in keys:
                    token, limits = keys[server.name]
                    server.admin_token = token
                    key = tenant_key(server, token, limits)
                    server.headers = {"authorization": f"Bearer {key}"}
            yield started
    finally:
        for server in started:
            stop(server)
        shutil.rmtree(folder, ignore_errors=True)


def measure(
    started: list[Server], requests: int, warmup: int, block: int, pause_s: float
) -> dict[str, list[float]]:
    clients = {
        s.name: httpx.Client(base_url=s.base_url, headers=s.headers, timeout=60) for s in started
    }
    try:
        names = list(clients)
        for _ in range(warmup):
            for name in names:
                clients[name].post("/v1/completions", json=BODY).raise_for_status()
        samples: dict[str, list[float]] = {name: [] for name in names}
        while min(len(v) for v in samples.values()) < requests:
            random.shuffle(names)
            for name in names:
                # vLLM's engine workers busy-wait for a second after each step: let the
                # previous server's go idle, so it takes no core from this one.
                time.sleep(pause_s)
                for i in range(block + BLOCK_WARMUP):
                    began = time.perf_counter()
                    answer = clients[name].post("/v1/completions", json=BODY)
                    elapsed = time.perf_counter() - began
                    if answer.status_code != 200:
                        raise SystemExit(f"{name} answered {answer.status_code}: {answer.text}")
                    if i >= BLOCK_WARMUP:
                        samples[name].append(elapsed)
        return {name: values[:requests] for name, values in samples.items()}
    finally:
        for client in clients.values():
            client.close()


def report(samples: dict[str, list[float]]) -> None:
    base = samples.get("vllm")
    print(f"{len(next(iter(samples.values()))):,} requests each, one at a time, interleaved:")
    print(f"  {'server':<16} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}   added to vllm")
    for name, values in samples.items():
        p50, p90, p99 = (percentile(values, q) * 1e3 for q in (0.5, 0.9, 0.99))
        extra = ""
        if base is not None and name != "vllm":
            b50, b99 = percentile(base, 0.5) * 1e3, percentile(base, 0.99) * 1e3
            paired = statistics.median(v - b for v, b in zip(values, base, strict=True)) * 1e3
            extra = f"   p50 {p50 - b50:+.2f}  p99 {p99 - b99:+.2f}  paired median {paired:+.2f}"
        print(f"  {name:<16} {p50:8.2f} {p90:8.2f} {p99:8.2f}{extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests to each server")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--block", type=int, default=100, help="requests per block")
    parser.add_argument("--pause", type=float, default=1.5, help="seconds between blocks")
    parser.add_argument(
        "--only",
        default="vllm,tollgate,tollgate-redis,tollgate-noauth",
        help="servers to run, comma-separated",
    )
    args = parser.parse_args()
    prepare_demo_models(ROOT / ".tollgate" / "models")
    with servers(set(args.only.split(","))) as started:
        samples = measure(started, args.requests, args.warmup, args.block, args.pause)
    report(samples)


if __name__ == "__main__":
    main()
