"""Shared fixtures: one real gateway process with real vLLM engines for the whole session."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
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
import psutil
import pytest

from serving.demo import prepare_demo_models
from tests.support.admin import Admin
from tests.support.postgres_server import PostgresServer, postgres_server
from tests.support.redis_server import RedisServer
from tests.support.redis_server import redis_server as start_redis
from tests.support.waits import wait_serving

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
    #: Its data directory (the engines' own output is in ``logs/`` there).
    data_dir: Path

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


@dataclass
class Deployment:
    """What every gateway replica of the test run shares: stores, secrets, telemetry."""

    env: dict[str, str]
    admin_token: str
    redis: RedisServer
    database_url: str
    #: Every secret the run issued (keys, the admin token), to search logs and spans for.
    secrets: list[str]
    gateways: list[Gateway] = field(default_factory=list)
    #: Bodies of the error responses the shared clients received.
    error_bodies: list[str] = field(default_factory=list)

    def record_errors(self, response: httpx.Response) -> None:
        """An httpx response hook: keep every error body."""
        if response.status_code >= 400:
            response.read()
            self.error_bodies.append(response.text)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with start_redis() as server:
        yield server


@pytest.fixture(scope="session")
def deployment(
    data_dir: Path,
    otlp_collector: Collector,
    redis_server: RedisServer,
    postgres: PostgresServer,
) -> Iterator[Deployment]:
    """The shared deployment: Redis for quotas, PostgreSQL for accounts, one secret."""
    admin_token = "tga_" + secrets.token_urlsafe(24)
    with postgres.database() as database_url:
        env = {
            **os.environ,
            "TOLLGATE_DATA_DIR": str(data_dir),
            "TOLLGATE_MAX_BODY_BYTES": str(1024 * 1024),
            "TOLLGATE_REDIS_URL": redis_server.url,
            "TOLLGATE_DATABASE_URL": database_url,
            "TOLLGATE_ADMIN_TOKEN": admin_token,
            "TOLLGATE_SECRET": secrets.token_urlsafe(32),
            # Redis shares two cores with up to three gateways, their engines and the
            # clients: under a burst it can be slow to answer for a moment, which the
            # default 150 ms would take for an outage (and rate limits would fail open).
            "TOLLGATE_QUOTA_TIMEOUT_MS": "300",
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_collector.url,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "OTEL_METRIC_EXPORT_INTERVAL": "1000",
            "OTEL_SERVICE_NAME": "tollgate-test",
        }
        yield Deployment(env, admin_token, redis_server, database_url, [admin_token])


def start_gateway(
    deployment: Deployment, log_path: Path, *extra_args: str, **extra_env: str
) -> Gateway:
    """Start one gateway replica of the deployment; wait for it with ``wait_ready``.

    Replicas given the same models file form one deployment (they share its catalog in the
    database); the shared gateway's demo catalog is the ``default`` one.
    """
    port = free_port()
    if "--models" in extra_args and "TOLLGATE_DEPLOYMENT" not in extra_env:
        models = Path(extra_args[extra_args.index("--models") + 1])
        digest = hashlib.sha256(models.read_bytes()).hexdigest()[:12]
        extra_env = {**extra_env, "TOLLGATE_DEPLOYMENT": f"{models.stem}-{digest}"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--port", str(port), *extra_args],
            cwd=ROOT,
            env={**deployment.env, **extra_env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    env = {**deployment.env, **extra_env}
    gw = Gateway(f"http://127.0.0.1:{port}", log_path, process, Path(env["TOLLGATE_DATA_DIR"]))
    deployment.gateways.append(gw)
    return gw


def wait_ready(gw: Gateway) -> None:
    wait_serving("gateway", gw.base_url, gw.process, gw.log, START_TIMEOUT_S)


def stop_gateway(gw: Gateway) -> None:
    gw.process.send_signal(signal.SIGTERM)
    try:
        gw.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(gw.process.pid, signal.SIGKILL)
        gw.process.wait()


@pytest.fixture(scope="session")
def gateway(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    # It takes over what a replica killed by a test left in the shared outbox after 5 s,
    # not the default 30 s.
    gw = start_gateway(
        deployment,
        tmp_path_factory.mktemp("gateway") / "gateway.log",
        TOLLGATE_OUTBOX_CLAIM_IDLE_S="5",
    )
    try:
        wait_ready(gw)
        yield gw
    finally:
        stop_gateway(gw)


@pytest.fixture(scope="session")
def victim(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway of the shared deployment whose engines the tests kill (and whose Redis they
    restart): both demo models, eager, waiting 3 s for an engine that restarts. Shared by the
    modules that break it, each of which leaves it serving again."""
    from tests.support.catalogs import CHAT_AND_EMBEDDINGS

    folder = tmp_path_factory.mktemp("victim")
    catalog = folder / "victim.toml"
    catalog.write_text(CHAT_AND_EMBEDDINGS)
    gw = start_gateway(
        deployment, folder / "gateway.log", "--models", str(catalog), TOLLGATE_ENGINE_WAIT_S="3"
    )
    try:
        wait_ready(gw)
        yield gw
    finally:
        stop_gateway(gw)


def chat_engine_core(gw: Gateway) -> psutil.Process:
    """demo-chat's engine core process under ``gw``, which may also run minilm's; called
    while chat requests are running.

    The engines' processes do not name their model and keep no weight file open once
    loaded; demo-chat's is the one working: its processes take most of the CPU time while
    generation runs (an embedding takes a fraction of one decode step). When neither works,
    it is the one whose processes hold the KV cache.
    """
    cores = [
        p
        for p in psutil.Process(gw.process.pid).children(recursive=True)
        if "EngineCore" in p.name()
    ]
    assert 1 <= len(cores) <= 2, [c.pid for c in cores]
    if len(cores) == 1:
        return cores[0]

    def cpu_s(core: psutil.Process) -> float:
        total = 0.0
        for process in (core, *core.children(recursive=True)):
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def unique_bytes(core: psutil.Process) -> int:
        total = 0
        for process in (core, *core.children(recursive=True)):
            with contextlib.suppress(psutil.Error):
                total += process.memory_full_info().uss
        return total

    before = [cpu_s(core) for core in cores]
    time.sleep(1.5)
    used = [cpu_s(core) - start for core, start in zip(cores, before, strict=True)]
    busy = max(range(2), key=lambda i: used[i])
    if used[busy] > 0.2 and used[busy] > 2 * used[1 - busy]:
        return cores[busy]
    # Nothing is generating (the requests are held up elsewhere): demo-chat's processes
    # hold its KV cache (0.25 GiB in the catalogs that run both; an encoder has none).
    light, heavy = sorted(cores, key=unique_bytes)
    assert unique_bytes(heavy) - unique_bytes(light) > 128 * 2**20, f"no engine busy: {used}"
    return heavy


@pytest.fixture(scope="session")
def admin(gateway: Gateway, deployment: Deployment) -> Iterator[Admin]:
    with httpx.Client(
        base_url=gateway.base_url + "/admin/v1",
        headers={"authorization": f"Bearer {deployment.admin_token}"},
        timeout=30,
        event_hooks={"response": [deployment.record_errors]},
    ) as c:
        yield Admin(c, deployment.secrets)


@pytest.fixture(scope="session")
def api_key(admin: Admin) -> str:
    """A key of a tenant with no limits, for the tests of the API itself."""
    tenant = admin.tenant("api-tests")
    return admin.key(tenant, "tests")


@pytest.fixture(scope="session")
def client(gateway: Gateway, api_key: str, deployment: Deployment) -> Iterator[openai.OpenAI]:
    recorder = httpx.Client(timeout=600, event_hooks={"response": [deployment.record_errors]})
    with openai.OpenAI(
        base_url=gateway.api_url, api_key=api_key, max_retries=0, http_client=recorder
    ) as c:
        yield c


@pytest.fixture
async def aclient(gateway: Gateway, api_key: str) -> openai.AsyncOpenAI:
    async with openai.AsyncOpenAI(
        base_url=gateway.api_url, api_key=api_key, max_retries=0, timeout=120
    ) as c:
        yield c  # type: ignore[misc]


@pytest.fixture(scope="session")
def http(gateway: Gateway, api_key: str, deployment: Deployment) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=gateway.base_url,
        timeout=60,
        headers={"authorization": f"Bearer {api_key}"},
        event_hooks={"response": [deployment.record_errors]},
    ) as c:
        yield c


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``last`` run after all others (they inspect what the whole run left)."""
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)


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


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server
