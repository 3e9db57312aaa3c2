"""The durable outbox between the request path and the ledger.

The request path appends each usage event; once `Outbox.append` returns the event survives
the process being killed. A flusher (`billing.flusher.Flusher`) claims events, records them
in the ledger and acknowledges them; an event claimed but never acknowledged (its flusher
died) is delivered again, and the ledger counts a second copy once. Two kinds:

- `SqlOutbox`: rows of the ``outbox`` table, in the ledger's own database. On a SQLite file
  an append is one short transaction on a connection of its own, run on the event loop's
  thread (WAL, ``synchronous=NORMAL``: a committed row survives a killed process, not a
  power cut). On PostgreSQL it is one autocommitted INSERT on a pooled connection the
  outbox keeps, run on a worker thread, with ``synchronous_commit=off``: the row survives
  the gateway being killed, and the database server crashing loses at most its last
  fraction of a second of commits (``synchronous="FULL"`` waits for the flush instead).
  `SqlOutbox.drain_into` moves a batch into the ledger in one transaction: exactly once,
  with no redelivery at all.
- `RedisOutbox`: a Redis stream (Redis 6.2 or later) read through a consumer group, shared
  by every replica. It is as durable as the server's persistence (``appendfsync``) makes it.

An entry whose payload does not decode holds up nothing behind it: `Outbox.claim_entries`
hands it back with its raw payload and the reason (`Claimed.rejected`), for the flusher to
move to the dead letters (`billing.deadletter`) and acknowledge; `SqlOutbox.drain_into`
dead-letters it, and every event the ledger refuses, in its own transaction.

`make_outbox` picks one. Exceptions::

    OutboxError            base of the outbox's errors
    └── OutboxUnavailable  the store behind the outbox failed or cannot be reached; retry later

An `OutboxUnavailable` message names the error class only, never a URL, host or password.
"""

from __future__ import annotations

import abc
import asyncio
import os
import secrets
import socket
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, TypeVar

import msgspec
import redis.asyncio
from redis.exceptions import RedisError, ResponseError
from sqlalchemy import Connection, Engine, delete, insert, select
from sqlalchemy.exc import DBAPIError

from billing.deadletter import Rejected, Source, reject
from billing.events import UsageEvent, decode_event, encode_event
from billing.ledger import InvalidEvent, Ledger, check_event
from billing.tables import outbox

__all__ = [
    "Claimed",
    "Drained",
    "Outbox",
    "OutboxError",
    "OutboxUnavailable",
    "RedisOutbox",
    "SqlOutbox",
    "make_outbox",
]

_T = TypeVar("_T")
#: The stream field that holds the encoded event.
_FIELD = b"e"
#: SQLite's text form of a naive UTC timestamp, as SQLAlchemy writes and reads it.
_SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"
_SQLITE_INSERT = "INSERT INTO outbox (event_id, payload, created_at) VALUES (?, ?, ?)"
_POSTGRES_INSERT = "INSERT INTO outbox (event_id, payload, created_at) VALUES (%s, %s, %s)"
_SQLITE_WAIT_MS = 5000


class OutboxError(Exception):
    """Base of the outbox's errors."""


class OutboxUnavailable(OutboxError):
    """The store behind the outbox failed or cannot be reached; the call may be retried."""


def _unavailable(exc: BaseException) -> OutboxUnavailable:
    # Only the class name: driver messages can carry hosts, ports and statements.
    return OutboxUnavailable(f"usage outbox unavailable ({type(exc).__name__})")


class Claimed(msgspec.Struct, frozen=True, kw_only=True):
    """One entry `Outbox.claim_entries` took: its event, or why its payload holds none."""

    #: What `Outbox.ack` takes to remove the entry.
    handle: str
    #: The payload as the outbox held it (what a dead letter keeps).
    payload: bytes
    #: The event; ``None`` when the payload does not decode.
    event: UsageEvent | None = None
    #: The dead letter to store instead, when the payload does not decode.
    rejected: Rejected | None = None


class Drained(msgspec.Struct, frozen=True, kw_only=True):
    """What one `SqlOutbox.drain_into` took out of the outbox."""

    #: Events handed to the ledger (new to it or not).
    recorded: int
    #: Entries moved to the dead letters instead.
    dead_lettered: int

    @property
    def moved(self) -> int:
        """Every entry that left the outbox."""
        return self.recorded + self.dead_lettered


def _decoded(handle: str, payload: bytes, event_id: str | None = None) -> Claimed:
    """The claimed entry of ``payload``: its event, or a dead letter when it does not decode."""
    try:
        event = decode_event(payload)
    except msgspec.DecodeError as exc:
        return Claimed(handle=handle, payload=payload, rejected=reject(payload, exc, event_id))
    return Claimed(handle=handle, payload=payload, event=event)


class Outbox(abc.ABC):
    """Usage events on their way to the ledger: appended once, delivered at least once."""

    #: The outbox kind, as its dead letters name it.
    source: ClassVar[Source]

    @abc.abstractmethod
    async def append(self, event: UsageEvent) -> None:
        """Adds ``event``; when this returns, it survives the process being killed.

        Raises:
            InvalidEvent: the ledger could not store the event (a bug of its producer).
            OutboxUnavailable: the store failed; the event may or may not be in.
        """

    @abc.abstractmethod
    async def claim_entries(self, max_entries: int) -> list[Claimed]:
        """Up to ``max_entries`` unacknowledged entries, oldest first.

        An entry claimed and not acknowledged is claimed again later (at once by
        `SqlOutbox`, after ``claim_idle_ms`` by another consumer of a `RedisOutbox`). An
        entry whose payload does not decode comes with `Claimed.rejected` set instead of
        its event: the caller stores that dead letter, then acknowledges it with the rest.

        Raises:
            OutboxUnavailable: the store failed.
        """

    async def claim(self, max_events: int) -> list[tuple[str, UsageEvent]]:
        """The events of `claim_entries`, each with its handle.

        Entries that do not decode are claimed but left out: they stay in the outbox until
        a caller of `claim_entries` dead-letters them.

        Raises:
            OutboxUnavailable: the store failed.
        """
        return [
            (entry.handle, entry.event)
            for entry in await self.claim_entries(max_events)
            if entry.event is not None
        ]

    @abc.abstractmethod
    async def ack(self, handles: Sequence[str]) -> None:
        """Removes the claimed events of ``handles``, now recorded in the ledger.

        Raises:
            OutboxUnavailable: the store failed; the events may be claimed again.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Releases what the outbox holds (connections, a client it made)."""


class SqlOutbox(Outbox):
    """The outbox as rows of the ``outbox`` table, handles being their ``seq``.

    Args:
        engine: The engine of a migrated database, usually the ledger's; not disposed of here.
        synchronous: ``"NORMAL"``: an appended row survives the gateway process being killed
            (SQLite ``synchronous=NORMAL``, PostgreSQL ``synchronous_commit=off``); ``"FULL"``:
            also a power cut or a database crash, at the cost of a disk flush per append.
    """

    source = "sql"

    def __init__(
        self, engine: Engine, *, synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    ) -> None:
        self._engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        path = engine.url.database if engine.dialect.name == "sqlite" else None
        self._direct = bool(path) and path != ":memory:" and not str(path).startswith("file:")
        self._fast: sqlite3.Connection | None = None
        self._slow: sqlite3.Connection | None = None
        if self._direct:
            assert path is not None  # narrowed by _direct
            # Appends on the event loop never wait for the write lock; when another writer
            # holds it, they queue for the second connection, which waits on a thread.
            self._fast = _sqlite_connect(path, synchronous, busy_timeout_ms=0)
            self._slow = _sqlite_connect(path, synchronous, busy_timeout_ms=_SQLITE_WAIT_MS)
        self._waiting = 0
        self._slow_lock = asyncio.Lock()
        self._synchronous = synchronous
        # PostgreSQL: appends share one connection kept out of the pool, one at a time.
        self._held: Connection | None = None
        self._held_lock = asyncio.Lock()

    @property
    def engine(self) -> Engine:
        """The engine of the outbox's database."""
        return self._engine

    def shares_database(self, ledger: Ledger) -> bool:
        """Whether ``ledger`` is in this outbox's database (so `drain_into` can serve it)."""
        return ledger.engine is self._engine or ledger.engine.url == self._engine.url

    async def append(self, event: UsageEvent) -> None:
        check_event(event)
        payload = encode_event(event)
        if self._postgres:
            async with self._held_lock:
                await self._threaded(self._append_held, event.id, payload)
            return
        if not self._direct:
            await self._threaded(self._append_pooled, event.id, payload)
            return
        row = (event.id, payload, datetime.now(UTC).strftime(_SQLITE_TIME))
        if self._waiting == 0:
            assert self._fast is not None  # set when _direct
            try:
                self._fast.execute(_SQLITE_INSERT, row)
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY:
                    raise _unavailable(exc) from exc
            except sqlite3.Error as exc:
                raise _unavailable(exc) from exc
        # Another writer holds the lock: wait for it on a thread, behind earlier waiters.
        self._waiting += 1
        try:
            async with self._slow_lock:
                assert self._slow is not None  # set when _direct
                await self._threaded(self._slow.execute, _SQLITE_INSERT, row)
        finally:
            self._waiting -= 1

    def _append_held(self, event_id: str, payload: bytes) -> None:
        if self._held is None:
            held = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            try:
                if self._synchronous == "NORMAL":
                    held.exec_driver_sql("SET synchronous_commit = off")
            except BaseException:
                held.close()
                raise
            self._held = held
        raw = self._held.connection.dbapi_connection
        assert raw is not None  # a connection in use has its driver's connection
        cursor = raw.cursor()
        try:
            # The driver's own cursor: a third less time than through SQLAlchemy.
            cursor.execute(_POSTGRES_INSERT, (event_id, payload, datetime.now(UTC)))
        except self._engine.dialect.loaded_dbapi.Error as exc:
            # The next append starts over on a fresh connection.
            held, self._held = self._held, None
            held.invalidate(exc)
            held.close()
            raise _unavailable(exc) from exc
        finally:
            cursor.close()

    def _append_pooled(self, event_id: str, payload: bytes) -> None:
        with self._engine.begin() as connection:
            connection.execute(
                insert(outbox).values(
                    event_id=event_id, payload=payload, created_at=datetime.now(UTC)
                )
            )

    async def claim_entries(self, max_entries: int) -> list[Claimed]:
        query = (
            select(outbox.c.seq, outbox.c.event_id, outbox.c.payload)
            .order_by(outbox.c.seq)
            .limit(max_entries)
        )

        def work() -> list[Claimed]:
            with self._engine.connect() as connection:
                rows = connection.execute(query).all()
            return [_decoded(str(seq), bytes(payload), event_id) for seq, event_id, payload in rows]

        return await self._threaded(work)

    async def ack(self, handles: Sequence[str]) -> None:
        if not handles:
            return
        statement = delete(outbox).where(outbox.c.seq.in_([int(handle) for handle in handles]))

        def work() -> None:
            with self._engine.begin() as connection:
                connection.execute(statement)

        await self._threaded(work)

    async def drain_into(self, ledger: Ledger, max_events: int) -> Drained:
        """Moves the oldest ``max_events`` entries into ``ledger`` in one transaction.

        The rows are deleted from the outbox and their events recorded in the same
        transaction, so each event counts exactly once whatever fails when. A row whose
        payload does not decode, or whose event the ledger refuses (`check_event`), goes to
        the ledger's dead letters in that transaction too, and the rest of the batch is
        recorded. Several drainers at once take different rows (PostgreSQL skips rows
        another one has locked; SQLite has one writer at a time).

        Returns:
            How many entries left the outbox: events recorded (new to the ledger or not)
            and entries dead-lettered.

        Raises:
            ValueError: ``ledger`` is in another database.
            OutboxUnavailable: the database failed; nothing moved.
        """
        if not self.shares_database(ledger):
            raise ValueError("drain_into needs the ledger in the outbox's own database")
        oldest = select(outbox.c.seq).order_by(outbox.c.seq).limit(max_events)
        if self._postgres:
            oldest = oldest.with_for_update(skip_locked=True)
        # A write first: on SQLite the transaction holds the write lock from the start.
        statement = (
            delete(outbox)
            .where(outbox.c.seq.in_(oldest.scalar_subquery()))
            .returning(outbox.c.seq, outbox.c.event_id, outbox.c.payload)
        )

        def work() -> Drained:
            with self._engine.begin() as connection:
                rows = sorted(connection.execute(statement).all())
                events: list[UsageEvent] = []
                rejected: list[Rejected] = []
                for seq, event_id, payload in rows:
                    entry = _decoded(str(seq), bytes(payload), event_id)
                    if entry.event is None:
                        assert entry.rejected is not None  # set when the event is not
                        rejected.append(entry.rejected)
                        continue
                    try:
                        check_event(entry.event)
                    except InvalidEvent as exc:
                        rejected.append(reject(entry.payload, exc, event_id))
                        continue
                    events.append(entry.event)
                ledger.record_sync(connection, events)
                ledger.dead_letter_sync(connection, self.source, rejected)
            return Drained(recorded=len(events), dead_lettered=len(rejected))

        return await self._threaded(work)

    async def close(self) -> None:
        async with self._held_lock:
            if self._held is not None:
                await asyncio.to_thread(self._held.close)
                self._held = None
        async with self._slow_lock:
            for connection in (self._fast, self._slow):
                if connection is not None:
                    connection.close()
            self._fast = self._slow = None
            self._direct = False

    async def _threaded(self, work: Callable[..., _T], *args: Any) -> _T:
        try:
            return await asyncio.to_thread(work, *args)
        except (DBAPIError, sqlite3.Error, OSError) as exc:
            raise _unavailable(exc) from exc


def _sqlite_connect(path: str, synchronous: str, *, busy_timeout_ms: int) -> sqlite3.Connection:
    # Autocommit: each INSERT is a transaction of its own, committed when execute returns.
    connection = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000
    )
    try:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute(f"PRAGMA synchronous = {synchronous}")
        # The flusher's commits checkpoint the log, off the event loop.
        connection.execute("PRAGMA wal_autocheckpoint = 0")
    except sqlite3.Error as exc:
        connection.close()
        raise _unavailable(exc) from exc
    return connection


class RedisOutbox(Outbox):
    """The outbox as a Redis stream, read by a consumer group; handles are entry ids.

    Args:
        client: A client made without ``decode_responses``; closed by `close` only when
            ``owns_client``.
        stream: The stream's key.
        group: The consumer group every flusher reads through.
        consumer: This reader's name in the group; unique per process by default.
        claim_idle_ms: How long an entry stays claimed, unacknowledged, before another
            consumer takes it over (its flusher is presumed dead).
        op_timeout_s: A deadline for each call, or ``None`` for the client's own timeouts.
        owns_client: Whether `close` closes ``client``.
    """

    source = "redis"

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        stream: str = "tg:usage",
        group: str = "ledger",
        consumer: str | None = None,
        claim_idle_ms: int = 30_000,
        op_timeout_s: float | None = 5.0,
        owns_client: bool = False,
    ) -> None:
        self._client = client
        self._stream = stream
        self._group = group
        self._consumer = consumer or (
            f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        )
        self._claim_idle_ms = claim_idle_ms
        self._op_timeout_s = op_timeout_s
        self._owns_client = owns_client
        self._group_ready = False
        #: Whether entries may be pending under this consumer's name that it never got: a
        #: reply lost when a call failed, or an earlier process of the same name.
        self._own_unknown = True

    @property
    def consumer(self) -> str:
        """This reader's name in the consumer group."""
        return self._consumer

    async def append(self, event: UsageEvent) -> None:
        stream, fields = self.entry(event)
        async with self._calling():
            await self._client.xadd(stream, fields)  # type: ignore[arg-type]

    def entry(self, event: UsageEvent) -> tuple[str, dict[bytes, bytes]]:
        """The stream key and the fields that `append` adds for ``event``, for a caller that
        sends the ``XADD`` itself (in one round trip with other commands).

        Raises:
            InvalidEvent: the ledger could not store the event.
        """
        check_event(event)
        return self._stream, {_FIELD: encode_event(event)}

    async def claim_entries(self, max_entries: int) -> list[Claimed]:
        """See `Outbox.claim_entries`. After a call of this outbox failed, the next claim
        starts with the entries pending under this consumer: the server may have delivered
        some whose reply never came, and they would otherwise wait ``claim_idle_ms``."""
        try:
            async with self._calling():
                try:
                    return await self._claim(max_entries)
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    # The stream went away (flushed, or a server that lost its data): again.
                    self._group_ready = False
                    return await self._claim(max_entries)
        except OutboxUnavailable:
            self._own_unknown = True
            raise

    async def _claim(self, max_events: int) -> list[Claimed]:
        if not self._group_ready:
            try:
                # From the stream's start: events appended before any flusher ran count too.
                await self._client.xgroup_create(self._stream, self._group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._group_ready = True
        entries: list[tuple[Any, Any]] = []
        if self._own_unknown:
            # This consumer's own pending entries (its history in the group) first.
            own = list(_stream_entries(await self._client.xreadgroup(
                self._group, self._consumer, {self._stream: "0"}, count=max_events
            )))  # fmt: skip
            entries.extend(own)
            self._own_unknown = len(own) >= max_events
        # Then what dead consumers left claimed, then what nobody has seen.
        if len(entries) < max_events:
            seen = {entry_id for entry_id, _ in entries}
            reply = await self._client.xautoclaim(
                self._stream,
                self._group,
                self._consumer,
                min_idle_time=self._claim_idle_ms,
                start_id="0-0",
                count=max_events - len(entries),
            )
            entries.extend(entry for entry in reply[1] if entry[0] not in seen)
        if len(entries) < max_events:
            read: Any = await self._client.xreadgroup(
                self._group,
                self._consumer,
                {self._stream: ">"},
                count=max_events - len(entries),
            )
            entries.extend(_stream_entries(read))
        claimed = []
        for entry_id, fields in entries:
            # An entry deleted while claimed comes back without fields; nothing to deliver.
            if not fields:
                continue
            handle = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            payload = fields.get(_FIELD, fields.get(_FIELD.decode()))
            if payload is None:
                # Not an entry of `append`: the dead letter keeps every field it has.
                raw = msgspec.json.encode({_text(k): _text(v) for k, v in fields.items()})
                missing = LookupError(f"the stream entry has no field {_FIELD.decode()!r}")
                claimed.append(Claimed(handle=handle, payload=raw, rejected=reject(raw, missing)))
                continue
            if isinstance(payload, str):  # a client made with decode_responses
                payload = payload.encode()
            claimed.append(_decoded(handle, payload))
        return claimed

    async def ack(self, handles: Sequence[str]) -> None:
        if not handles:
            return
        async with self._calling(), self._client.pipeline(transaction=True) as pipe:
            pipe.xack(self._stream, self._group, *handles)
            pipe.xdel(self._stream, *handles)
            await pipe.execute()

    async def close(self) -> None:
        """Leaves the group when nothing is claimed by this consumer; closes an owned client."""
        try:
            if self._group_ready:
                async with self._calling():
                    pending = await self._client.xpending_range(
                        self._stream, self._group, "-", "+", 1, consumername=self._consumer
                    )
                    if not pending:
                        await self._client.xgroup_delconsumer(
                            self._stream, self._group, self._consumer
                        )
        except OutboxUnavailable:
            pass  # the consumer stays listed; harmless
        finally:
            if self._owns_client:
                await self._client.aclose()

    @asynccontextmanager
    async def _calling(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self._op_timeout_s):
                yield
        except (RedisError, OSError) as exc:
            # TimeoutError (asyncio's deadline, a socket's) is an OSError.
            raise _unavailable(exc) from exc


def _stream_entries(read: Any) -> Iterator[tuple[Any, Any]]:
    """The entries of an ``XREADGROUP`` reply of one stream."""
    # One [stream, entries] pair per stream read (RESP2; a dict on RESP3).
    streams = read.items() if isinstance(read, dict) else read or ()
    for _stream, stream_entries in streams:
        yield from stream_entries


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


def make_outbox(
    engine: Engine,
    redis_url: str | None = None,
    *,
    claim_idle_ms: int = 30_000,
    timeout_s: float = 5.0,
) -> Outbox:
    """The outbox of a deployment: a `RedisOutbox` when ``redis_url`` is set, else `SqlOutbox`.

    Args:
        engine: The ledger's engine (the SQL outbox lives in its database).
        redis_url: The shared Redis, or ``None``.
        claim_idle_ms: How long a dead flusher's claimed events wait before another takes them.
        timeout_s: The Redis client's connect and reply timeout.

    Raises:
        ValueError: ``redis_url`` is not a Redis URL.
    """
    if redis_url is None:
        return SqlOutbox(engine)
    client = redis.asyncio.Redis.from_url(
        redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )
    return RedisOutbox(
        client, claim_idle_ms=claim_idle_ms, op_timeout_s=2 * timeout_s, owns_client=True
    )
