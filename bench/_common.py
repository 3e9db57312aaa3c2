"""What the benchmarks share: percentiles, free ports, a throwaway Redis, a migrated
PostgreSQL database, and the servers of ``bench/gateway.py``."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def redis_url(*server_args: str, db: int = 0) -> Iterator[str]:
    """``TOLLGATE_REDIS_URL`` if set, else a throwaway ``redis-server`` started with
    ``server_args`` (persistence, say) for this run."""
    if os.environ.get("TOLLGATE_REDIS_URL"):
        yield os.environ["TOLLGATE_REDIS_URL"]
        return
    import redis

    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    folder = tempfile.mkdtemp()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--dir", folder, *server_args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/{db}"
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def postgres_url() -> Iterator[str]:
    """A fresh, migrated database on the configured or the local PostgreSQL server."""
    from gateway.db import upgrade
    from tests.support.postgres_server import PostgresServer, postgres_server

    configured = os.environ.get("TOLLGATE_DATABASE_URL", "")
    if configured.startswith(("postgres://", "postgresql")):
        with PostgresServer(configured).database() as url:
            upgrade(url)
            yield url
        return
    with postgres_server() as server, server.database() as url:
        upgrade(url)
        yield url


def bench_servers() -> ModuleType:
    """``bench/gateway.py``, whose helpers start ``tollgate serve`` and vLLM's server (loaded by
    path: its module name, ``gateway``, is the package's)."""
    loaded = sys.modules.get("bench_servers")
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(
        "bench_servers", Path(__file__).parent / "gateway.py"
    )
    if spec is None or spec.loader is None:
        raise SystemExit("bench/gateway.py is missing")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_servers"] = module
    spec.loader.exec_module(module)
    return module
