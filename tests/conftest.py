"""Shared fixtures: one real gateway process with real vLLM engines for the whole session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest

from serving.demo import prepare_demo_models

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = float(os.environ.get("TOLLGATE_TEST_START_TIMEOUT", "900"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Collector:
    """An OTLP/HTTP receiver standing in for the remote collector the gateway exports to."""

    url: str
    received: dict[str, list[bytes]] = field(default_factory=lambda: {"traces": [], "metrics": []})
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bodies(self, signal_name: str) -> list[bytes]:
        with self.lock:
            return list(self.received[signal_name])


@pytest.fixture(scope="session")
def otlp_collector() -> Iterator[Collector]:
    collector = Collector(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            kind = self.path.rstrip("/").rsplit("/", 1)[-1]
            if kind in collector.received:
                with collector.lock:
                    collector.received[kind].append(body)
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    collector.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield collector
    server.shutdown()
    server.server_close()


@dataclass
class Gateway:
    base_url: str
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def api_url(self) -> str:
        return self.base_url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = ROOT / ".tollgate"
    prepare_demo_models(path / "models")
    return path


@pytest.fixture(scope="session")
def gateway(
    data_dir: Path, otlp_collector: Collector, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("gateway") / "gateway.log"
    env = {
        **os.environ,
        "TOLLGATE_DATA_DIR": str(data_dir),
        "TOLLGATE_MAX_BODY_BYTES": str(1024 * 1024),
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_collector.url,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "OTEL_METRIC_EXPORT_INTERVAL": "1000",
        "OTEL_SERVICE_NAME": "tollgate-test",
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    gw = Gateway(f"http://127.0.0.1:{port}", log_path, process)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"gateway exited with {process.returncode}:\n{gw.log()[-5000:]}")
            try:
                if httpx.get(gw.base_url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"gateway not ready after {START_TIMEOUT_S} s:\n{gw.log()[-5000:]}")
            time.sleep(0.5)
        yield gw
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="session")
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway.api_url, api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture
async def aclient(gateway: Gateway) -> openai.AsyncOpenAI:
    async with openai.AsyncOpenAI(
        base_url=gateway.api_url, api_key="unused", max_retries=0, timeout=120
    ) as c:
        yield c  # type: ignore[misc]


@pytest.fixture(scope="session")
def http(gateway: Gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.base_url, timeout=60) as c:
        yield c


def engine_stats(http: httpx.Client, model: str) -> dict[str, float]:
    """The engine figures the gateway reports, read from vLLM's scheduler stats."""
    body = http.get("/readyz").json()
    return dict(body["models"][model])


def wait_idle(http: httpx.Client, model: str, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        stats = engine_stats(http, model)
        if stats["running"] == 0 and stats["waiting"] == 0:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"engine {model} still busy: {stats}")
        time.sleep(0.05)
