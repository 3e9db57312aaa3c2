"""The last resort of the usage path: a local file for records no store would take.

When the outbox and its fallback both fail (Redis and the database down, a full disk on the
database server), a usage event or a quota settlement is written here instead, and replayed
into the stores once they answer again. The spool is a SQLite file on the gateway's own disk,
written with ``synchronous=FULL``: when `Spool.put` returns, the record survives the process
being killed and the machine losing power.

Each record has a kind (``event``, ``settlement``), a key unique within its kind (the request
id) and an opaque payload; putting a key twice keeps the last payload. Several processes may
share one file (replicas on one data directory): SQLite serialises their writes, and what is
replayed is applied at most once by its store (the ledger ignores an event id it holds, the
quota store a settled request id), so two replayers do no harm.

The calls block on the disk (each one a transaction synced to it, rollback journal); call
them from a worker thread on an event loop.

Exceptions: `SpoolError` (also an `OSError`) when the file cannot be written or read; its
message names the path and the error, nothing else.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["Spool", "SpoolError"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL DEFAULT (julianday('now')),
    PRIMARY KEY (kind, key)
)
"""


class SpoolError(OSError):
    """The spool file cannot be written or read."""


class Spool:
    """Records kept on local disk until a store takes them.

    The file is opened for each call and closed after it: calls are rare (an outage), and
    nothing is held open that a failing disk could wedge.

    Args:
        path: The SQLite file; made (with its folder) when missing.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                connection = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
            except (sqlite3.Error, OSError) as exc:
                raise self._error(exc) from exc
            try:
                connection.execute("PRAGMA synchronous = FULL")
                connection.execute(_SCHEMA)
                yield connection
            except sqlite3.Error as exc:
                raise self._error(exc) from exc
            finally:
                connection.close()

    def _error(self, exc: BaseException) -> SpoolError:
        return SpoolError(f"usage spool {self.path}: {type(exc).__name__}: {exc}")

    def put(self, kind: str, key: str, payload: bytes) -> None:
        """Keep a record; when this returns it is on disk.

        Raises:
            SpoolError: it could not be written.
        """
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO spool (kind, key, payload) VALUES (?, ?, ?)",
                (kind, key, payload),
            )

    def take(self, kind: str, limit: int = 500) -> list[tuple[str, bytes]]:
        """Up to ``limit`` records of ``kind``, oldest first; they stay until `remove`.

        Raises:
            SpoolError: the file could not be read.
        """
        with self._connect() as db:
            rows = db.execute(
                "SELECT key, payload FROM spool WHERE kind = ? ORDER BY created_at, key LIMIT ?",
                (kind, limit),
            ).fetchall()
        return [(str(key), bytes(payload)) for key, payload in rows]

    def remove(self, kind: str, keys: Iterable[str]) -> None:
        """Forget records a store has taken.

        Raises:
            SpoolError: the file could not be written.
        """
        batch = [(kind, key) for key in keys]
        if batch:
            with self._connect() as db:
                db.executemany("DELETE FROM spool WHERE kind = ? AND key = ?", batch)

    def count(self, kind: str | None = None) -> int:
        """How many records are kept (of ``kind``, or of every kind); 0 without a file.

        Raises:
            SpoolError: the file could not be read.
        """
        if not self.path.exists():
            return 0
        with self._connect() as db:
            if kind is None:
                row = db.execute("SELECT count(*) FROM spool").fetchone()
            else:
                row = db.execute("SELECT count(*) FROM spool WHERE kind = ?", (kind,)).fetchone()
        return int(row[0])

    def close(self) -> None:
        """Nothing is held open between calls; kept for symmetry with the stores."""
