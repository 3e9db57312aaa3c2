from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import QueuePool

from gateway.db import make_engine, normalize_url, redact_url


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgres://u@h:5433/db", "postgresql+psycopg://u@h:5433/db"),
        ("POSTGRES://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u:pw@h/db", "postgresql+psycopg://u:pw@h/db"),
        ("postgresql+psycopg2://u:pw@h/db", "postgresql+psycopg://u:pw@h/db"),
        ("postgresql+asyncpg://u:pw@h/db", "postgresql+psycopg://u:pw@h/db"),
        (
            "postgresql://u:pw@h/db?sslmode=require",
            "postgresql+psycopg://u:pw@h/db?sslmode=require",
        ),
        ("postgresql://h/db", "postgresql+psycopg://h/db"),
        ("postgresql:///db?host=/run/postgresql", "postgresql+psycopg:///db?host=/run/postgresql"),
        ("  postgresql://u@h/db\n", "postgresql+psycopg://u@h/db"),
        # Passwords with reserved characters work whether or not they were encoded.
        ("postgresql://u:p@ss@h/db", "postgresql+psycopg://u:p%40ss@h/db"),
        ("postgresql://u:p%40ss@h/db", "postgresql+psycopg://u:p%40ss@h/db"),
        ("postgresql://u:a/b:c@h/db", "postgresql+psycopg://u:a%2Fb%3Ac@h/db"),
        ("postgresql://u:50%off@h/db", "postgresql+psycopg://u:50%25off@h/db"),
        ("postgresql://u@srv:pw@h/db", "postgresql+psycopg://u%40srv:pw@h/db"),
        ("postgresql://u:pw@h/db?application_name=a@b", None),
        ("sqlite:///relative/path.db", "sqlite:///relative/path.db"),
        ("sqlite:////abs/path.db", "sqlite:////abs/path.db"),
        ("sqlite://", "sqlite://"),
        ("sqlite+pysqlite:///x.db", "sqlite+pysqlite:///x.db"),
    ],
)
def test_normalize_url(given: str, expected: str | None) -> None:
    normalized = normalize_url(given)
    if expected is not None:
        assert normalized == expected
    if normalized.startswith("postgresql"):
        assert make_url(normalized).host in {"h", None}


def test_normalized_password_parses_back() -> None:
    url = make_url(normalize_url("postgres://user@srv:p@s/s:w%rd@db.example:6432/tollgate?x=1"))
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "user@srv",
        "p@s/s:w%rd",
        "db.example",
        6432,
        "tollgate",
    )
    assert dict(url.query) == {"x": "1"}
    url = make_url(normalize_url("postgresql://u:p@h/d?application_name=a@b"))
    assert (url.username, url.password, url.host) == ("u", "p", "h")


@pytest.mark.parametrize("url", ["mysql://u@h/db", "redis://h", "nonsense", "", "://h"])
def test_normalize_url_refuses_other_databases(url: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        normalize_url(url)


def test_unsupported_url_error_hides_the_password() -> None:
    with pytest.raises(ValueError, match="unsupported") as raised:
        normalize_url("mysql://u:hunter2@h/db")
    assert "hunter2" not in str(raised.value)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:hunter2@h/db", "postgresql://u:***@h/db"),
        ("postgresql+psycopg://u:hun@ter2@h:5/db?x=1", "postgresql+psycopg://u:***@h:5/db?x=1"),
        ("postgres://u:hunter2@h/db?password=hunter2", "postgres://u:***@h/db?password=***"),
        (
            "postgresql://h/db?user=u&password=hunter2&x=1",
            "postgresql://h/db?user=u&password=***&x=1",
        ),
        ("redis://:hunter2@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://default:hunter2@h:6379", "rediss://default:***@h:6379"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("sqlite:///x.db", "sqlite:///x.db"),
        ("postgresql://h/db?application_name=a@b", "postgresql://h/db?application_name=a@b"),
        ("not a url ?password=hunter2", "not a url ?password=***"),
    ],
)
def test_redact_url(given: str, expected: str) -> None:
    assert redact_url(given) == expected


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:hunter2@h/db",
        "postgresql://u:hunter2@h/db?",
        "postgresql://u:hun?ter2@h/db",
        "postgresql://u:hun@ter2@h/db?application_name=a@b",
        "redis://:hun?ter2@h:6379/0",
    ],
)
def test_redact_url_never_shows_the_password(url: str) -> None:
    assert "hunter2" not in redact_url(url)
    assert "ter2" not in redact_url(url)
    if url.startswith("postgresql"):
        assert "ter2" not in redact_url(normalize_url(url))


def test_sqlite_engine_settings(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "folder" / "tollgate.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as connection:
            assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert connection.execute(text("PRAGMA busy_timeout")).scalar() == 5000
            assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert path.exists()
    finally:
        engine.dispose()


def test_sqlite_memory_engine_is_shared_across_threads() -> None:
    engine = make_engine("sqlite://")
    try:
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE t (x INTEGER)"))
        seen: list[int] = []

        def read() -> None:
            with engine.connect() as connection:
                seen.append(len(connection.execute(text("SELECT * FROM t")).all()))

        thread = threading.Thread(target=read)
        thread.start()
        thread.join()
        assert seen == [0]
    finally:
        engine.dispose()


def test_postgresql_engine_settings() -> None:
    engine = make_engine("postgres://u:pw@h/db")
    assert engine.dialect.driver == "psycopg"
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    assert pool.size() == 5
    assert pool._pre_ping
    engine.dispose()
