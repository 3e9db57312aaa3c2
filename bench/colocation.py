"""More models than devices: what a switch costs here, and how many devices a long-tail demand
needs through the placement planner.

1. Switching on this machine. ``tollgate serve`` holds two copies of ``demo-chat`` on a device
   budget that fits one, and requests alternate between them: every request brings its model
   in (the other stops, this one starts; vLLM on CPU has no sleep mode). Against it, what a
   user of vLLM's own server does to change models: stop the server and start one on the
   other model (``python -m vllm.entrypoints.openai.api_server``), timed to its first answer.
   Rounds of the two alternate.
2. The planner on the shipped 20-model trace (``tests/data/placement``), with the stop and
   start costs just measured, and with vLLM's sleep mode costs of a GPU (assumed: no GPU
   here): devices needed against one device per model, cold starts, share of requests whose
   time to first token is within the target.

    .venv/bin/python bench/colocation.py [--rounds 3] [--slo-ms 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import bench_servers, free_port  # noqa: E402 (after the path is set)
from serving.demo import prepare_demo_models  # noqa: E402
from serving.placement import (  # noqa: E402
    COSTS,
    load_trace,
    plan_fleet,
    profiles_from,
    report,
)

MODELS = ("chat-a", "chat-b")
TRACE = ROOT / "tests" / "data" / "placement" / "trace-20-models.jsonl"
ENTRY = """
[[models]]
name = "{name}"
source = "{source}"
kind = "chat"
memory_gb = 1.6

[models.engine]
max_model_len = 512
dtype = "float32"
kv_cache_gb = 0.25
max_num_seqs = 16
"""


def chat(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def start_tollgate(folder: Path) -> tuple[Any, str, str]:
    """The gateway, its admin token and a tenant's key."""
    servers = bench_servers()
    source = ROOT / ".tollgate" / "models" / "demo-chat"
    catalog = folder / "two-chats.toml"
    catalog.write_text("".join(ENTRY.format(name=n, source=source) for n in MODELS))
    data = folder / "tollgate"
    data.mkdir()
    token = "tga_" + secrets.token_urlsafe(24)
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("TOLLGATE_", "OTEL_"))},
        "TOLLGATE_DATA_DIR": str(data),
        "TOLLGATE_ADMIN_TOKEN": token,
        "TOLLGATE_LOG_LEVEL": "WARNING",
        "TOLLGATE_DEVICE_MEMORY_GB": "2.0",
        "TOLLGATE_CACHE": "false",
    }
    log = data / "gateway.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--port",
                str(port),
                "--models",
                str(catalog),
            ],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = servers.Server("tollgate", f"http://127.0.0.1:{port}", process, log)
    servers.wait_ready(server)
    return server, token, servers.tenant_key(server, token, None)


def vllm_restart(folder: Path, model_dir: Path) -> tuple[float, float]:
    """Start vLLM's server on the model, time it to its first answer, and stop it: (start to
    first answer, stop) in seconds."""
    port = free_port()
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    args += ["--served-model-name", "m", "--port", str(port), "--max-model-len", "512"]
    args += ["--dtype", "float32", "--kv-cache-memory-bytes", str(1 << 28), "--max-num-seqs", "16"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    began = time.monotonic()
    with (folder / "vllm.log").open("ab") as out:
        process = subprocess.Popen(
            args, env=env, cwd=folder, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    while True:
        if process.poll() is not None:
            raise SystemExit(f"vLLM's server exited; see {folder / 'vllm.log'}")
        try:
            if httpx.post(url, json=chat("m"), timeout=30).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    started = time.monotonic() - began
    began = time.monotonic()
    process.terminate()
    process.wait(timeout=120)
    return started, time.monotonic() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slo-ms", type=float, default=5000.0)
    parser.add_argument("--device-gb", type=float, default=80.0)
    args = parser.parse_args()
    prepare_demo_models(ROOT / ".tollgate" / "models")
    folder = Path(tempfile.mkdtemp(prefix="colocation-"))
    servers = bench_servers()
    tollgate, token, key = start_tollgate(folder)
    api = httpx.Client(
        base_url=tollgate.base_url + "/v1",
        headers={"authorization": f"Bearer {key}"},
        timeout=600,
    )
    switches: list[float] = []
    starts: list[float] = []
    vllm_starts: list[float] = []
    vllm_stops: list[float] = []
    try:
        api.post("/chat/completions", json=chat(MODELS[0])).raise_for_status()  # resident
        turn = 1
        for _ in range(args.rounds):
            for _ in range(2):  # two switches a round: to the other model and back
                answer = api.post("/chat/completions", json=chat(MODELS[turn % 2]))
                answer.raise_for_status()
                switches.append(float(answer.headers["x-tollgate-cold-start-ms"]) / 1000)
                turn += 1
            start, stop = vllm_restart(folder, ROOT / ".tollgate" / "models" / "demo-chat")
            vllm_starts.append(start)
            vllm_stops.append(stop)
            print(
                f"round: tollgate switches {switches[-2]:.1f} s, {switches[-1]:.1f} s; "
                f"vLLM server start to first answer {start:.1f} s, stop {stop:.1f} s",
                flush=True,
            )
        admin = httpx.get(
            tollgate.base_url + "/admin/v1/models", headers={"authorization": f"Bearer {token}"}
        ).json()["data"]
        for row in admin:
            if row["cold_starts"]:
                starts.append(row["cold_start_ms_total"] / row["cold_starts"] / 1000)
    finally:
        api.close()
        servers.stop(tollgate)
    switch = statistics.median(switches)
    start = statistics.median(starts)
    stop = max(switch - start, 0.0)
    vllm_switch = statistics.median(a + b for a, b in zip(vllm_starts, vllm_stops, strict=True))
    print()
    print("Switching models on this machine (median):")
    print(f"  tollgate, engine stop + start in process: {switch:.1f} s (start {start:.1f} s)")
    vllm_start, vllm_stop = statistics.median(vllm_starts), statistics.median(vllm_stops)
    print(
        f"  vLLM's server, stop + start to first answer: {vllm_switch:.1f} s "
        f"(start {vllm_start:.1f} s, stop {vllm_stop:.1f} s)"
    )
    print(f"  ratio: {switch / vllm_switch:.2f}")
    trace = load_trace(TRACE)
    sizes = json.loads(TRACE.with_name("trace-20-models.models.json").read_text())
    measured = {"start_s": round(start, 1), "stop_s": round(stop, 1)}
    for label, costs in (
        (f"measured here (start {start:.1f} s, stop {stop:.1f} s)", measured),
        ("GPU sleep mode (assumed: sleep 1 s, wake 2 s, start 30 s)", COSTS["gpu-sleep"]),
    ):
        plan = plan_fleet(trace, profiles_from(sizes, costs), args.device_gb, args.slo_ms)
        print()
        print(f"Placement of the 20-model trace, switch costs {label}:")
        print(report(plan, trace), end="")


if __name__ == "__main__":
    main()
