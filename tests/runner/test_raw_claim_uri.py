"""A SQLite file given as a ``file:`` URI has no WAL reader of its own
(db.create_read_engine: its reads go through the write engine), so its
claim is no raw transaction (Runtime.claims_raw): a prompt that needs a
read would wait there for the write lock the raw claim holds, and the
claim roll back at the lock's timeout, every time. On asyncio and uvloop."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from app import db, orm
from app.runner import execute
from app.runtime import Runtime
from tests.runner.test_raw_claim import _thread_longer_than_the_prefetch
from tests.runner.test_straight_commit import _checked_out, _lock_free
from tests.runner.test_worker import _make_runs, _statuses

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])]


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    yield f"sqlite+aiosqlite:///file:{tmp_path / 'test.db'}?uri=true"


async def test_a_uri_given_file_claims_in_a_transaction_and_reads_a_long_thread_in_it(runtime: Runtime) -> None:
    assert runtime.read_engine is runtime.engine
    assert not runtime.claims_raw()
    # A wait for the write lock fails in 2 s rather than the server's 30.
    db._WRITERS[runtime.engine.sync_engine].timeout = 2.0
    (run_id,) = await _make_runs(runtime, 1)
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
        assert run is not None
        await _thread_longer_than_the_prefetch(session, run)  # the prompt needs a read
    (execution,) = await execute.claim_and_start(runtime, "test:0:uri", 1, 60.0, {})
    assert execution.finished
    assert await _statuses(runtime, [run_id]) == {run_id: "completed"}
    assert _checked_out(runtime) == 0
    _lock_free(runtime)
