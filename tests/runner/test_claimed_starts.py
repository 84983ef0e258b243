"""PostgreSQL: the starts of the runs one claim took are one statement
(issue 17, branch pgbatch: app/services/claimed_starts.py), in the claim's
transaction: each run moved to in_progress under the claimer's lease, its
events numbered after its log's end (its buffered deltas first), delivered
in order at the commit; a cancel that meets the claim waits for its commit
and the run then ends cancelled, as before."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from sqlalchemy import select, text

from app import llm, orm
from app.run_log import RUN_EVENTS_CHANNEL
from app.runner import execute
from app.runtime import Runtime
from app.services import claimed_starts, run_state, runs
from app.services.projects import Project
from app.wire.events import Event
from tests.runner.helpers import until
from tests.runner.test_carried_end import _logged, _sent
from tests.runner.test_quick_answer import _provider
from tests.runner.test_worker import _make_runs

pytestmark = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # PostgreSQL's starts

_OWNER = "test:0:starts"


def _streams(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """A provider's model: its answer streamed (no run answered in the claim)."""

    async def streamed(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        yield llm.TextDelta("Hello")
        yield llm.Finish("stop", llm.Usage(3, 1))

    _provider(runtime, monkeypatch, streamed)


def _deliveries(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[tuple[int, str]]]:
    """Every entry delivered to followers from now on, (seq, event) by run."""
    delivered: dict[str, list[tuple[int, str]]] = {}
    deliver = runtime.bus.deliver

    def noted(topic: str, entries: Any) -> None:
        delivered.setdefault(topic, []).extend((entry.seq, entry.event.name) for entry in entries)
        deliver(topic, entries)

    monkeypatch.setattr(runtime.bus, "deliver", noted)
    return delivered


async def test_a_claims_runs_start_in_one_statement(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    _streams(runtime, monkeypatch)
    run_ids = await _make_runs(runtime, 4)
    logs, moves = _sent(runtime, "INSERT INTO run_events"), _sent(runtime, "UPDATE runs")
    executions = await execute.claim_and_start(runtime, _OWNER, 4, 60.0, {})
    assert sorted(execution.run_id for execution in executions) == sorted(run_ids)
    assert not any(execution.finished for execution in executions)
    assert len(logs) == 1  # every run's start and events: one statement
    assert len(moves) == 2  # the claim's UPDATE, then the starts'
    async with runtime.transaction() as session:
        rows = (await session.scalars(select(orm.Run).where(orm.Run.id.in_(run_ids)))).all()
    for row in rows:
        assert (row.status, row.lease_owner, row.required_action) == ("in_progress", _OWNER, None)
        logged = await _logged(runtime, row.id)
        assert [(seq, name) for seq, name, _data in logged] == [(1, "thread.run.in_progress")]
        data = logged[0][2]
        assert (data["id"], data["status"], data["started_at"]) == (row.id, "in_progress", row.started_at)


async def test_claimed_starts_number_each_runs_events_after_its_log(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each run's start is numbered after what its log holds, its buffered
    deltas logged first, and followers get each run's entries in order."""
    _streams(runtime, monkeypatch)
    first, second, third = await _make_runs(runtime, 3)
    for run_id, earlier in ((first, 1), (second, 3)):
        async with runtime.transaction() as session:
            events = [Event("thread.run.step.delta", {"id": f"step_{n}", "delta": {}}) for n in range(earlier)]
            await runtime.run_log.append(session, run_id, events)
    delivered = _deliveries(runtime, monkeypatch)
    async with runtime.run_log.holding(third):  # the flusher leaves its delta to the claim
        runtime.run_log.publish(third, [Event("thread.message.delta", {"id": "msg_x", "delta": {}})])
        executions = await execute.claim_and_start(runtime, _OWNER, 3, 60.0, {})
    assert len(executions) == 3
    expected = {
        first: [(1, "thread.run.step.delta"), (2, "thread.run.in_progress")],
        second: [*((n, "thread.run.step.delta") for n in (1, 2, 3)), (4, "thread.run.in_progress")],
        third: [(1, "thread.message.delta"), (2, "thread.run.in_progress")],
    }
    for run_id, entries in expected.items():
        assert [(seq, name) for seq, name, _data in await _logged(runtime, run_id)] == entries
    # At the commit: each run's start, the third's delta (PostgreSQL's are delivered once written) before it.
    assert delivered == {run_id: entries[-1:] for run_id, entries in expected.items()} | {third: expected[third]}
    assert third not in runtime.run_log._buffer


async def test_a_cancel_meeting_the_claim_waits_and_the_run_ends_cancelled(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel of a run the claim has locked waits for the claim's commit
    (the run started), then moves it to cancelling; its execution ends it
    cancelled, its events in order."""
    _streams(runtime, monkeypatch)
    (run_id,) = await _make_runs(runtime, 1)
    real = claimed_starts.insert_starting
    cancels: list[asyncio.Task[None]] = []

    async def cancel() -> None:
        async with runtime.transaction() as session:
            run = await session.get(orm.Run, run_id)
            assert run is not None
            _answer, events = await runs.cancel(
                session, Project(id=orm.DEFAULT_PROJECT_ID, name="default"), run.thread_id, run_id
            )
            await runtime.run_log.append(session, run_id, events, run_locked=True)

    async def lock_waits() -> bool:
        async with runtime.reading_statement() as session:
            waits = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            return bool((await session.execute(text(waits))).scalar())

    async def meeting_a_cancel(*args: Any, **kwargs: Any) -> dict[str, int]:
        cancels.append(asyncio.create_task(cancel()))
        await until(lock_waits, "the cancel waiting for the claimed run's row")
        return await real(*args, **kwargs)

    monkeypatch.setattr(claimed_starts, "insert_starting", meeting_a_cancel)
    (execution,) = await execute.claim_and_start(runtime, _OWNER, 1, 60.0, {})
    async with asyncio.timeout(30):
        await cancels[0]
        await execute.run(execution)
    names = [name for _seq, name, _data in await _logged(runtime, run_id)]
    assert names[:2] == ["thread.run.in_progress", "thread.run.cancelling"]
    assert names[-1] == "thread.run.cancelled"
    async with runtime.transaction() as session:
        row = await session.get(orm.Run, run_id)
        assert row is not None and row.status == "cancelled"


async def _run_rows(runtime: Runtime, run_ids: list[str]) -> dict[str, tuple[Any, ...]]:
    """Each run's status, lease owner, required action as stored (JSON text,
    or None for SQL NULL) and whether it has a start time."""
    query = text(
        "SELECT id, status, lease_owner, CAST(required_action AS text), started_at IS NOT NULL "
        "FROM runs WHERE id = ANY(:ids)"
    )
    async with runtime.transaction() as session:
        return {row[0]: tuple(row[1:]) for row in await session.execute(query, {"ids": run_ids})}


@pytest.mark.parametrize("changed", ["status = 'cancelling'", "lease_owner = 'test:1:other'"])
async def test_a_run_the_starts_miss_rolls_the_whole_claim_back(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, changed: str
) -> None:
    """The compare-and-set of each start (the status the claim returned, the
    claimer's lease): a run that no longer matches (changed here in the
    claim's own transaction, just before the starts) fails the claim, named;
    nothing is started or logged, the buffered delta is back in the buffer,
    and the runs are claimable again and then start right."""
    _streams(runtime, monkeypatch)
    first, second, third = await _make_runs(runtime, 3)
    real = claimed_starts.insert_starting

    async def after_a_change(session: Any, *args: Any, **kwargs: Any) -> dict[str, int]:
        await session.execute(text(f"UPDATE runs SET {changed} WHERE id = :id"), {"id": second})
        return await real(session, *args, **kwargs)

    monkeypatch.setattr(claimed_starts, "insert_starting", after_a_change)
    # Both claims in one holding(): the flusher leaves the queued run's delta to the claims.
    async with runtime.run_log.holding(third):
        runtime.run_log.publish(third, [Event("thread.message.delta", {"id": "msg_x", "delta": {}})])
        with pytest.raises(run_state.TransitionConflict, match=second):
            await execute.claim_and_start(runtime, _OWNER, 3, 60.0, {})
        assert [event.name for _seq, event in runtime.run_log._buffer[third]] == ["thread.message.delta"]
        assert not runtime.run_log._appending
        rows = await _run_rows(runtime, [first, second, third])
        assert {row[:2] for row in rows.values()} == {("queued", None)}, rows
        for run_id in (first, second, third):
            assert await _logged(runtime, run_id) == []
        monkeypatch.setattr(claimed_starts, "insert_starting", real)
        executions = await execute.claim_and_start(runtime, _OWNER, 3, 60.0, {})
    assert len(executions) == 3
    assert [(seq, name) for seq, name, _data in await _logged(runtime, third)] == [
        (1, "thread.message.delta"),
        (2, "thread.run.in_progress"),
    ]


@asynccontextmanager
async def _notified(runtime: Runtime) -> AsyncIterator[list[str]]:
    """The payloads NOTIFYed on the run events' channel while open, heard on
    a connection of the test's own."""
    url = runtime.engine.url.set(drivername="postgresql")
    connection = await asyncpg.connect(url.render_as_string(hide_password=False))
    heard: list[str] = []
    try:
        await connection.add_listener(RUN_EVENTS_CHANNEL, lambda *args: heard.append(args[3]))
        yield heard
    finally:
        await connection.close()


# What differs from run to run in a run's in_progress event (each of
# _make_runs' batches has an assistant of its own; the times are the
# clock's, the expiry from the run's creation).
_RUN_SPECIFIC = frozenset({"id", "thread_id", "assistant_id", "created_at", "started_at", "expires_at"})


def _run_specific(data: dict[str, Any]) -> dict[str, Any]:
    """A run's in_progress event without what differs from run to run."""
    return {key: value for key, value in data.items() if key not in _RUN_SPECIFIC}


async def test_claimed_starts_write_and_notify_as_the_one_run_start(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three runs started by the one statement, then three by the one-run
    start (batchable() refused): the same rows (the required action JSON's
    null), the same event, and a NOTIFY "<run id> <origin>" for each run."""
    _streams(runtime, monkeypatch)
    async with _notified(runtime) as heard:
        batched = await _make_runs(runtime, 3)
        logs = _sent(runtime, "INSERT INTO run_events")
        await execute.claim_and_start(runtime, _OWNER, 3, 60.0, {})
        assert len(logs) == 1  # the batched statement
        await until(lambda: len(heard) >= 3, "the batched starts' NOTIFYs")
        assert sorted(heard) == sorted(f"{run_id} {runtime.run_log.origin}" for run_id in batched)
        heard.clear()
        monkeypatch.setattr(claimed_starts, "batchable", lambda _held: False)
        one_by_one = await _make_runs(runtime, 3)
        await execute.claim_and_start(runtime, _OWNER, 3, 60.0, {})
        assert len(logs) == 4  # a statement a run
        await until(lambda: len(heard) >= 3, "the one-run starts' NOTIFYs")
        assert sorted(heard) == sorted(f"{run_id} {runtime.run_log.origin}" for run_id in one_by_one)
    rows = await _run_rows(runtime, batched + one_by_one)
    assert (
        {rows[run_id] for run_id in batched}
        == {rows[run_id] for run_id in one_by_one}
        == {("in_progress", _OWNER, "null", True)}
    )
    logged = {run_id: await _logged(runtime, run_id) for run_id in batched + one_by_one}
    assert {len(entries) for entries in logged.values()} == {1}
    batched_data, one_run_data = logged[batched[0]][0][2], logged[one_by_one[0]][0][2]
    assert list(batched_data) == list(one_run_data)  # the same keys, in the same order
    assert _run_specific(batched_data) == _run_specific(one_run_data)
