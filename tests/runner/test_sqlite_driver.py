"""app/sqlite_driver.py: a statement is one hop to aiosqlite's thread and a
transaction's BEGIN IMMEDIATE goes with its first statement; the write lock
must still cover every statement of the transaction (issue 10), streamed or not."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from app.runtime import Runtime


def _write_lock_is_free(path: str) -> bool:
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError as error:
        assert "locked" in str(error)
        return False
    finally:
        other.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("streamed", [False, True])
async def test_a_transaction_holds_the_write_lock_from_its_first_statement(runtime: Runtime, streamed: bool) -> None:
    path = make_url(runtime.settings.resolved_database_url()).database
    assert path is not None
    async with runtime.transaction() as session:
        if streamed:
            rows = [row async for row in await session.stream(text("SELECT id FROM runs"))]
        else:
            rows = list((await session.execute(text("SELECT id FROM runs"))).all())
        assert rows == []
        assert not _write_lock_is_free(path)
    assert _write_lock_is_free(path)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_statement_reports_its_rowcount_and_rows(runtime: Runtime) -> None:
    async with runtime.transaction() as session:
        await session.execute(text("CREATE TEMP TABLE t (n INTEGER)"))
        await session.execute(text("INSERT INTO t (n) VALUES (:n)"), [{"n": n} for n in range(5)])
        moved = await session.execute(text("UPDATE t SET n = n + 10 WHERE n >= 3"))
        assert moved.rowcount == 2  # type: ignore[attr-defined]  # compare-and-set relies on it
        assert (await session.execute(text("SELECT n FROM t ORDER BY n"))).scalars().all() == [0, 1, 2, 13, 14]
