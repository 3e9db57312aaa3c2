"""Dead letters: outbox entries the ledger cannot take, kept as they were received.

An entry whose payload does not decode as a usage event, or whose event the ledger refuses
(`billing.ledger.InvalidEvent`), would stop every event behind it if it were retried. The
flusher and `billing.outbox.SqlOutbox.drain_into` move it to the ``usage_dead_letter`` table
instead, with its raw payload and the reason, and take it out of the outbox: nothing is
lost, and an operator reads it back (`billing.ledger.Ledger.dead_letters`), fixes the
producer and replays the payload.

`SqlOutbox.drain_into` stores dead letters and deletes their rows in one transaction. On the
claim and acknowledge path (a Redis stream) they are two steps, as recording and
acknowledging events are: a flusher that dies in between leaves the entry to be claimed
again, and it is dead-lettered a second time (a copy, never a loss).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Literal

import msgspec
from sqlalchemy import Connection, func, insert, select

from billing.tables import usage_dead_letter, utcnow

__all__ = [
    "ERROR_LENGTH",
    "DeadLetter",
    "Rejected",
    "Source",
    "count_dead_letters",
    "describe",
    "read_dead_letters",
    "read_event_id",
    "reject",
    "store_dead_letters",
]

#: The outbox kind a dead letter came from.
Source = Literal["redis", "sql"]
#: The longest ``error`` a dead letter keeps.
ERROR_LENGTH = 500
_EVENT_ID_LENGTH = 64


class Rejected(msgspec.Struct, frozen=True, kw_only=True):
    """An outbox entry on its way to the dead letters."""

    #: The payload as the outbox held it.
    payload: bytes
    #: Why the ledger cannot take it: the error class and a short message.
    error: str
    #: The event id as far as it can be read; ``None`` when the payload holds none.
    event_id: str | None = None


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A stored dead letter."""

    seq: int
    event_id: str | None
    source: Source
    payload: bytes
    error: str
    created_at: datetime


class _EventId(msgspec.Struct):
    id: str


_id_decoder = msgspec.json.Decoder(_EventId)


def describe(exc: BaseException) -> str:
    """``exc`` as a dead letter's ``error``: its class and message, at most `ERROR_LENGTH` long.

    Only for errors whose message holds no connection details: a decoding error, an
    `InvalidEvent`.
    """
    return _clean(f"{type(exc).__name__}: {exc}")[:ERROR_LENGTH]


def read_event_id(payload: bytes) -> str | None:
    """The event id in ``payload`` if it is a JSON object with a string ``id``, else ``None``."""
    try:
        event_id = _id_decoder.decode(payload).id
    except msgspec.DecodeError:
        return None
    return _clean(event_id)[:_EVENT_ID_LENGTH] or None


def reject(payload: bytes, exc: BaseException, event_id: str | None = None) -> Rejected:
    """The dead letter of ``payload``, refused with ``exc``.

    Args:
        payload: The raw payload.
        exc: Why it was refused (see `describe`).
        event_id: The event id when known; else read from ``payload`` if it can be.
    """
    if event_id is None:
        event_id = read_event_id(payload)
    else:
        event_id = _clean(event_id)[:_EVENT_ID_LENGTH] or None
    return Rejected(payload=payload, error=describe(exc), event_id=event_id)


def store_dead_letters(connection: Connection, source: Source, rejected: Iterable[Rejected]) -> int:
    """Inserts ``rejected`` inside the caller's transaction.

    Returns:
        How many dead letters were stored.
    """
    now = utcnow()
    rows = [
        {
            "event_id": entry.event_id,
            "source": source,
            "payload": entry.payload,
            "error": entry.error,
            "created_at": now,
        }
        for entry in rejected
    ]
    if rows:
        connection.execute(insert(usage_dead_letter), rows)
    return len(rows)


def read_dead_letters(connection: Connection, limit: int) -> list[DeadLetter]:
    """The newest ``limit`` dead letters, newest first."""
    query = select(usage_dead_letter).order_by(usage_dead_letter.c.seq.desc()).limit(limit)
    return [
        DeadLetter(
            seq=int(row.seq),
            event_id=row.event_id,
            source=row.source,
            payload=bytes(row.payload),
            error=row.error,
            created_at=row.created_at,
        )
        for row in connection.execute(query)
    ]


def count_dead_letters(connection: Connection) -> int:
    """How many dead letters there are."""
    query = select(func.count()).select_from(usage_dead_letter)
    return int(connection.execute(query).scalar_one())


def _clean(text: str) -> str:
    # Text PostgreSQL stores as it is: no NUL character, no lone surrogate.
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
