"""``tollgate worker`` processes for the tests of gateways in front of workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.waits import wait_serving

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 420.0


@dataclass
class WorkerProcess:
    id: str
    url: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready(self) -> dict[str, object]:
        answer: dict[str, object] = httpx.get(self.url + "/readyz", timeout=5).json()
        return answer

    def finished(self, model: str = "demo-chat") -> int:
        """Requests the worker's engine for ``model`` has finished (its scheduler's count)."""
        models = self.ready()["models"]
        assert isinstance(models, dict)
        return int(models[model]["requests_finished"])


def start_worker(
    env: dict[str, str], worker_id: str, port: int, models: Path, log_path: Path, **extra: str
) -> WorkerProcess:
    """Start a worker; wait for it with `wait_worker`."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "worker",
                "--port",
                str(port),
                "--models",
                str(models),
            ],
            cwd=ROOT,
            env={
                **env,
                "TOLLGATE_WORKER_ID": worker_id,
                "TOLLGATE_ENGINE_LOG": str(log_path.with_suffix(".engines.log")),
                **extra,
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return WorkerProcess(worker_id, f"http://127.0.0.1:{port}", log_path, process)


def wait_worker(worker: WorkerProcess) -> None:
    wait_serving("worker", worker.url, worker.process, worker.log, START_TIMEOUT_S)


def stop_worker(worker: WorkerProcess) -> None:
    if worker.process.poll() is not None:
        return
    worker.process.send_signal(signal.SIGTERM)
    try:
        worker.process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(worker.process.pid, signal.SIGKILL)
        worker.process.wait()


def kill_worker(worker: WorkerProcess) -> None:
    """SIGKILL the worker and every process it started (its engines)."""
    os.killpg(worker.process.pid, signal.SIGKILL)
    worker.process.wait()
