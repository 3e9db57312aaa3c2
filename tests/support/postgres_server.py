"""A PostgreSQL server for the tests, and fresh databases on it.

`postgres_server` finds one, in this order:

1. ``TOLLGATE_TEST_POSTGRES_URL``, when set (a URL to a database the user may create
   databases from, usually ``postgres``);
2. a server on ``127.0.0.1:5432`` that lets user ``postgres`` (or ``root``) in without a
   password;
3. a throwaway server it starts from the PostgreSQL binaries (``initdb``, ``pg_ctl``) in a
   temporary folder, on a free port, and stops and removes at the end.

The server is shared: however many fixtures enter `postgres_server` at once, there is one,
and a throwaway one stops when the last of them leaves.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

__all__ = ["PostgresServer", "postgres_server"]

URL_VARIABLE = "TOLLGATE_TEST_POSTGRES_URL"
LOCAL_URLS = (
    "postgresql://postgres@127.0.0.1:5432/postgres",
    "postgresql://root@127.0.0.1:5432/postgres",
)
#: initdb refuses to run as root; a throwaway server runs as this user instead.
SERVER_USER = "postgres"
START_TIMEOUT_S = 60


@dataclass(frozen=True)
class PostgresServer:
    """A reachable server; ``url`` names a database to create others from."""

    url: str

    def database_url(self, name: str) -> str:
        """The URL of database ``name`` on this server, as users write it."""
        url = make_url(self.url).set(drivername="postgresql", database=name)
        return url.render_as_string(hide_password=False)

    def _connect(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(_libpq(self.url), autocommit=True, connect_timeout=5)

    def create_database(self) -> str:
        """A new, empty, randomly named database; returns its URL."""
        name = f"tollgate_test_{secrets.token_hex(6)}"
        with self._connect() as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.database_url(name)

    def drop_database(self, url: str) -> None:
        """Drops the database at ``url``, closing whatever connections it still has."""
        name = make_url(url).database
        if not name:
            raise ValueError(f"no database named in {url!r}")
        with self._connect() as connection:
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    @contextmanager
    def database(self) -> Iterator[str]:
        """A fresh database for the duration of the block, dropped afterwards; yields its URL."""
        url = self.create_database()
        try:
            yield url
        finally:
            self.drop_database(url)


def _libpq(url: str) -> str:
    """``url`` as libpq takes it (no ``+driver`` in the scheme)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(_libpq(url), connect_timeout=2, autocommit=True) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


def _bin_dir() -> Path:
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        found = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if found:
            candidates.append(Path(found))

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    raise RuntimeError(
        "the tests need PostgreSQL and found none: set "
        f"{URL_VARIABLE}, run a server on 127.0.0.1:5432 that trusts user postgres, or "
        "install postgresql (for example `apt-get install postgresql`) so that a throwaway "
        "server can be started"
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def _throwaway_server() -> Iterator[PostgresServer]:
    bin_dir = _bin_dir()
    root = Path(tempfile.mkdtemp(prefix="tollgate-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam(SERVER_USER)
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError(
                f"initdb refuses to run as root and there is no user {SERVER_USER!r} to run it "
                f"as: create one, or set {URL_VARIABLE}"
            ) from None
        os.chown(root, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", SERVER_USER, "--"]
    data, log = root / "data", root / "server.log"
    port = _free_port()
    options = (
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    )
    started = False
    try:
        subprocess.run(
            [
                *as_user,
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            timeout=START_TIMEOUT_S,
        )
        start = subprocess.run(
            [
                *as_user,
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(log),
                "-o",
                options,
                "-w",
                "-t",
                str(START_TIMEOUT_S),
                "start",
            ],
            check=False,
            capture_output=True,
            timeout=START_TIMEOUT_S + 10,
        )
        if start.returncode != 0:
            server_log = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"a throwaway PostgreSQL did not start:\n{server_log}")
        started = True
        yield PostgresServer(f"postgresql://postgres@127.0.0.1:{port}/postgres")
    finally:
        if started:
            subprocess.run(
                [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                check=False,
                capture_output=True,
                timeout=START_TIMEOUT_S,
            )
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def _find_server() -> Iterator[PostgresServer]:
    configured = os.environ.get(URL_VARIABLE)
    if configured:
        if not _answers(configured):
            raise RuntimeError(f"{URL_VARIABLE} is set but its server does not answer")
        yield PostgresServer(configured)
        return
    for url in LOCAL_URLS:
        if _answers(url):
            yield PostgresServer(url)
            return
    with _throwaway_server() as server:
        yield server


_lock = threading.Lock()
_users = 0
_shared: PostgresServer | None = None
_stack: ExitStack | None = None


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """The tests' PostgreSQL server, shared by every caller inside this block.

    Raises:
        RuntimeError: no server is configured or running, and none can be started.
    """
    global _users, _shared, _stack
    with _lock:
        if _shared is None:
            stack = ExitStack()
            _shared = stack.enter_context(_find_server())
            _stack = stack
        _users += 1
        server = _shared
    try:
        yield server
    finally:
        with _lock:
            _users -= 1
            if _users == 0 and _stack is not None:
                stack, _stack, _shared = _stack, None, None
                stack.close()
