from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from billing.tables import metadata as billing_metadata
from gateway.db import current, make_engine, metadata, upgrade
from gateway.db.migrate import head

TABLES = {
    "tenant",
    "api_key",
    "quota_policy",
    "price",
    "usage_event",
    "usage_rollup",
    "outbox",
    "usage_dead_letter",
    "serving_policy",
    "deployed_models",
    "catalog_seeds",
    "device_rollup",
    "alembic_version",
}


def schema_differences(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, [metadata, billing_metadata]))
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_empty_database_to_head_twice(new_database: Callable[[], str]) -> None:
    database_url = new_database()
    assert current(database_url) is None
    assert table_names(database_url) == set()
    upgrade(database_url)
    assert current(database_url) == head() == "0007"
    assert table_names(database_url) == TABLES
    upgrade(database_url)
    assert current(database_url) == head()


def test_migrated_schema_matches_the_tables(database_url: str) -> None:
    upgrade(database_url)
    assert schema_differences(database_url) == []


def test_schema_comparison_notices_a_difference(new_database: Callable[[], str]) -> None:
    url = new_database()
    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("DROP INDEX ix_api_key_digest")
    finally:
        engine.dispose()
    assert [diff[0] for diff in schema_differences(url)] == ["add_index"]  # type: ignore[index]  # alembic's diffs are tuples here


def test_concurrent_upgrades_in_threads(new_database: Callable[[], str]) -> None:
    url = new_database()
    start = threading.Barrier(4)

    def run() -> str | None:
        start.wait()
        upgrade(url)
        return current(url)

    with ThreadPoolExecutor(4) as pool:
        results = [pool.submit(run) for _ in range(4)]
        assert [result.result(timeout=120) for result in results] == [head()] * 4
    assert schema_differences(url) == []


def test_concurrent_upgrades_in_processes(new_database: Callable[[], str]) -> None:
    url = new_database()
    script = "import sys\nfrom gateway.db import upgrade\nupgrade(sys.argv[1])\n"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for _ in range(3)
    ]
    for process in processes:
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, output.decode(errors="replace")
    assert current(url) == head()
    assert schema_differences(url) == []
