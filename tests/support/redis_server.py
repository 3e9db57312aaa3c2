"""A throwaway Redis server for the tests, started from the ``redis-server`` binary.

`redis_server` starts one on a free loopback port in a temporary folder and removes both at
the end. Its data lives in an append-only file that Redis writes as it goes and syncs when it
stops, so a ``stop()`` and a ``start()`` (on the same port and folder) keep it, as a restarted
production Redis would. It never fsyncs while running: on a small shared test machine a
periodic fsync behind a busy disk stalls Redis for seconds, which the gateways would rightly
read as an outage.
``pause()`` and ``resume()`` freeze and thaw the process: it still accepts connections (the
kernel does) but answers nothing, the way a hung Redis behaves.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

__all__ = ["RedisServer", "redis_server"]

FALLBACK_BINARY = "/usr/bin/redis-server"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 20.0


def find_binary() -> str:
    """The path of ``redis-server``.

    Raises:
        RuntimeError: there is none; install it (``apt-get install redis-server``).
    """
    binary = shutil.which("redis-server") or FALLBACK_BINARY
    if not os.access(binary, os.X_OK):
        raise RuntimeError(
            "redis-server not found: the tests need it; install it "
            "(e.g. `apt-get install redis-server`, which `make setup` does)"
        )
    return binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process on a fixed port and data folder, restartable."""

    def __init__(self, binary: str, port: int, directory: Path) -> None:
        self.binary = binary
        self.port = port
        self.directory = directory
        self._process: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def paused(self) -> bool:
        return self.running and self._paused

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        """Start the server (a no-op when it runs) and wait until it answers PING.

        Raises:
            RuntimeError: it exited or did not answer in time; the message has its log.
        """
        if self.running:
            return
        self._paused = False
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "no",
            "--logfile", str(self.directory / "redis.log"),
            "--daemonize", "no",
        ]  # fmt: skip
        if os.geteuid() == 0 and shutil.which("nice"):
            # Redis stands in for a server with cores of its own: on a small test machine,
            # busy gateways and engines must not starve it into looking hung.
            command = ["nice", "-n", "-10", *command]
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers_ping():
            if self._process.poll() is not None:
                stderr = self._process.stderr.read() if self._process.stderr else b""
                self._process = None
                raise RuntimeError(
                    f"redis-server exited on port {self.port}: "
                    f"{stderr.decode(errors='replace')}{self.log()[-3000:]}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING:\n{self.log()[-3000:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (SIGTERM, wait; a no-op when it is not running)."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            if self._paused:
                process.send_signal(signal.SIGCONT)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stderr:
            process.stderr.close()
        self._paused = False

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections open, nothing answers."""
        if self._process is None or not self.running:
            raise RuntimeError("redis-server is not running")
        self._process.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Thaw a paused server (SIGCONT; a no-op when it is not paused)."""
        if self._process is not None and self._paused:
            self._process.send_signal(signal.SIGCONT)
        self._paused = False

    def fresh(self) -> str:
        """Running, answering and empty (whatever an earlier test did to it); its URL."""
        self.resume()
        self.start()
        with redis.Redis.from_url(self.url) as client:
            client.flushall()
        return self.url

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    """A running throwaway server, stopped and deleted at the end whatever happened.

    Raises:
        RuntimeError: no ``redis-server`` binary, or it would not start.
    """
    binary = find_binary()
    with tempfile.TemporaryDirectory(prefix="tollgate-redis-") as directory:
        server = RedisServer(binary, free_port(), Path(directory))
        try:
            for attempt in range(3):
                try:
                    server.start()
                    break
                except RuntimeError:
                    # The free port may have been taken meanwhile; try another one.
                    if attempt == 2:
                        raise
                    server.port = free_port()
            yield server
        finally:
            server.stop()
