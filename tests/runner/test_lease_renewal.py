"""The worker's one lease renewer (app/lease_renewer.py): every period one
statement renews the leases of all the runs the worker executes; a run
whose lease is lost is stopped, one whose lease was cleared is left alone
(never given a lease back); runs answered in their claim, and runs that end
before their first renewal is due, cost no task and no statement. The
margin: a lease counts from before the statement that stamped it, once its
transaction committed; an attempt is cut off well within the lease; a run
whose renewals keep failing is stopped before its lease lapses."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, asynccontextmanager
from typing import Any

import pytest
import uvloop
from sqlalchemy import event, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app import orm
from app.lease_renewer import LeaseRenewer
from app.runner import execute
from app.runtime import Runtime
from app.services import run_execution
from app.settings import Settings
from app.worker import Worker
from tests.runner.helpers import DEADLINE, running_worker, runtime_with_lease, statements_sent, stop_worker, until
from tests.runner.test_worker import _make_runs, _statuses

LONG_RUN = "[[delay 100]] [[tokens 3000]]"  # five minutes: ended by the test


# The margin of a loaded CI machine (2 cores at load 2-4): there a renewal's
# transaction, or a cancelled one's rollback, took more than 0.5 s, and the
# loop's timers fired late by as much. A 3 s lease (attempts cut off at
# 0.5 s, runs given up at 2.7 s) left too little: its tests failed there.
LEASE_SECONDS = 30.0  # attempts cut off at 5 s, runs given up at 27 s


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    async with runtime_with_lease(settings, LEASE_SECONDS) as rt:
        yield rt


@pytest.fixture
async def short_lease_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """A 3 s lease, given up at 2.7 s: for the tests whose every renewal
    fails at once (no attempt there waits on the machine), a give-up soon."""
    async with runtime_with_lease(settings, 3.0) as rt:
        yield rt


async def _worker_renewing_every_second(runtime: Runtime) -> tuple[Worker, asyncio.Task[None]]:
    """A running worker whose renewals come every second, not every third
    of its lease: the tests see rounds soon, each attempt with 5 s to work."""
    worker, task = await running_worker(runtime)
    worker.leases.period = 1.0
    return worker, task


def _run_ids(parameter: Any) -> list[str]:
    """The run ids a statement's parameter binds: the ids are one parameter,
    a list (PostgreSQL's array) or its JSON text (SQLite's json_each)."""
    if isinstance(parameter, str) and parameter.startswith('["run_'):
        parameter = json.loads(parameter)
    if isinstance(parameter, list):
        return [value for value in parameter if isinstance(value, str) and value.startswith("run_")]
    return []


def renewal_statements(runtime: Runtime) -> AbstractContextManager[list[tuple[float, set[str]]]]:
    """Each renewal UPDATE sent while inside: when, and the run ids it names."""

    def renewal(statement: str, parameters: Any) -> tuple[float, set[str]] | None:
        if not " ".join(statement.split()).startswith("UPDATE runs SET lease_expires_at"):
            return None
        values = parameters.values() if isinstance(parameters, dict) else parameters
        return time.time(), {run_id for value in values for run_id in _run_ids(value)}

    return statements_sent(runtime, renewal)


async def _leases(runtime: Runtime, run_ids: list[str]) -> dict[str, tuple[str | None, float | None]]:
    async with runtime.transaction() as session:
        query = select(orm.Run.id, orm.Run.lease_owner, orm.Run.lease_expires_at).where(orm.Run.id.in_(run_ids))
        return {row.id: (row.lease_owner, row.lease_expires_at) for row in (await session.execute(query)).all()}


async def test_one_statement_renews_every_executing_run_before_its_lease_lapses(runtime: Runtime) -> None:
    worker, task = await _worker_renewing_every_second(runtime)
    try:
        with renewal_statements(runtime) as renewals:
            first = await _make_runs(runtime, 2, text=LONG_RUN)
            await until(lambda: worker.busy == 2, "the first runs to start")
            claimed = await _leases(runtime, first)
            await until(lambda: len(renewals) >= 1, "a renewal")
            # A run claimed between two renewals is renewed within a period of its claim.
            (late,) = await _make_runs(runtime, 1, text=LONG_RUN)
            await until(lambda: worker.busy == 3, "the late run to start")
            (late_claim,) = (await _leases(runtime, [late])).values()
            await until(lambda: any(late in ids for _at, ids in renewals), "the late run's renewal")
            await until(lambda: sum(1 for _at, ids in renewals if ids == {*first, late}) >= 2, "renewals of all three")
            leases = await _leases(runtime, [*first, late])
            # Counted while its statements are recorded: a round after the
            # block and before the stop would otherwise count unrecorded.
            await worker.leases.idle()
            rounds, recorded = worker.leases.rounds, len(renewals)
    finally:
        await stop_worker(worker, task)
    assert all(ids for _at, ids in renewals)
    assert {run_id for _at, ids in renewals for run_id in ids} == {*first, late}
    assert rounds == recorded  # one statement per round, whatever the number of runs
    # Within a few of its 1 s rounds of the claim, not only before its lapse.
    late_renewed_at = next(at for at, ids in renewals if late in ids)
    assert late_claim[1] is not None and late_renewed_at < late_claim[1] - LEASE_SECONDS + 5.0
    for run_id, (owner, expires_at) in leases.items():
        assert owner == worker.owner and expires_at is not None
        assert expires_at > (late_claim[1] if run_id == late else claimed[run_id][1] or 0)  # renewed, not lapsed
    assert set((await _statuses(runtime, [*first, late])).values()) == {"in_progress"}


async def test_only_the_run_another_worker_took_over_is_stopped(runtime: Runtime) -> None:
    worker, task = await _worker_renewing_every_second(runtime)
    try:
        kept, taken = await _make_runs(runtime, 2, text=LONG_RUN)
        await until(lambda: worker.busy == 2, "the runs to start")
        async with runtime.transaction() as session:  # as if another worker claimed it after a lapse
            await session.execute(
                update(orm.Run)
                .where(orm.Run.id == taken)
                .values(lease_owner="other-worker", lease_expires_at=time.time() + 600)
            )
        await until(lambda: worker.leases.held == {kept}, "the taken-over run to be given up")
        await until(lambda: worker.busy == 1, "its execution to stop")
        before = (await _leases(runtime, [kept]))[kept][1] or 0
        await until(lambda: _renewed_since(runtime, kept, before), "the other run's lease to be renewed again")
        assert worker.busy == 1
    finally:
        await stop_worker(worker, task)
    assert await _leases(runtime, [taken]) == {taken: ("other-worker", pytest.approx(time.time() + 600, abs=60))}


async def _renewed_since(runtime: Runtime, run_id: str, expires_at: float) -> bool:
    return ((await _leases(runtime, [run_id]))[run_id][1] or 0) > expires_at


async def test_a_failed_renewal_is_retried(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_renew = run_execution.renew
    failures = [RuntimeError("database is locked")]

    async def renew_failing_once(*args: Any, **kwargs: Any) -> list[str]:
        if failures:
            raise failures.pop()
        return await real_renew(*args, **kwargs)

    monkeypatch.setattr(run_execution, "renew", renew_failing_once)
    worker, task = await _worker_renewing_every_second(runtime)
    try:
        with caplog.at_level(logging.WARNING, logger="app.worker"):
            (run_id,) = await _make_runs(runtime, 1, text=LONG_RUN)
            await until(lambda: worker.busy == 1, "the run to start")
            claimed = (await _leases(runtime, [run_id]))[run_id][1] or 0
            await until(lambda: not failures, "the failed renewal")
            await until(lambda: _renewed_since(runtime, run_id, claimed), "the retried renewal")
        assert worker.busy == 1 and worker.leases.held == {run_id}
    finally:
        await stop_worker(worker, task)
    assert f"renewing the lease of run {run_id} failed (database is locked); retrying" in caplog.text
    assert "lost the lease" not in caplog.text


async def test_renewals_failing_until_the_lease_would_lapse_stop_the_execution(
    short_lease_runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def renew_failing(*_args: Any, **_kwargs: Any) -> list[str]:
        raise RuntimeError("database is locked")

    monkeypatch.setattr(run_execution, "renew", renew_failing)
    runtime = short_lease_runtime
    worker, task = await running_worker(runtime)
    try:
        with caplog.at_level(logging.WARNING, logger="app.worker"):
            (run_id,) = await _make_runs(runtime, 1, text=LONG_RUN)
            await until(lambda: worker.busy == 1, "the run to start")
            claimed_at = time.time()
            (_owner, first_lease) = (await _leases(runtime, [run_id]))[run_id]
            execution = worker._tasks[run_id]
            await until(execution.done, "the execution to stop")
    finally:
        await stop_worker(worker, task)
    assert execution.cancelled()
    (lost, *_) = [record for record in caplog.records if record.getMessage().startswith("lost the lease")]
    assert lost.getMessage() == f"lost the lease of run {run_id}; stopping its execution here"
    assert first_lease is not None and claimed_at <= first_lease
    # About when the lease would lapse, not minutes later (given up at 2.7 s
    # of 3: 1.3 s for a loaded machine's late timer).
    assert lost.created < first_lease + 1.0
    assert (await _statuses(runtime, [run_id]))[run_id] == "in_progress"  # resumable, not failed


async def test_a_run_given_up_is_handed_back_at_the_next_tick_not_at_its_lapse(
    short_lease_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose renewals kept failing is given up (its execution stopped)
    and then released by the worker's next good tick, so that it is resumed
    at once rather than when its lease lapses. (Its lease here runs far
    beyond the test, as one a renewal stamped without the renewer learning
    it did: left alone, it would not be resumed within the test.)"""

    async def renew_failing(*_args: Any, **_kwargs: Any) -> list[str]:
        raise RuntimeError("database is locked")

    monkeypatch.setattr(run_execution, "renew", renew_failing)
    runtime = short_lease_runtime
    worker, task = await running_worker(runtime)
    try:
        (run_id,) = await _make_runs(runtime, 1, text=LONG_RUN)
        await until(lambda: worker.busy == 1, "the run to start")
        first = worker._tasks[run_id]
        async with runtime.transaction() as session:
            await session.execute(
                update(orm.Run).where(orm.Run.id == run_id).values(lease_expires_at=time.time() + 600)
            )
        await until(first.done, "the run to be given up")
        await until(lambda: worker._tasks.get(run_id) not in (None, first), "the run to be resumed")
    finally:
        await stop_worker(worker, task)


async def test_one_round_renews_what_it_holds_and_never_revives_a_cleared_lease(runtime: Runtime) -> None:
    """Three held runs, one statement: this owner's lease is renewed; a
    cleared lease (released, or the run left the executor) stays cleared and
    its execution is not stopped by that round (it is about to end; like any
    lease not renewed, it would be given up at GIVE_UP_FRACTION of the
    lease); another owner's lease stops its execution."""
    owned, released, taken = await _make_runs(runtime, 3, status="in_progress")
    owner = "this-worker"
    stamped = time.time() + 1.0  # as a claim stamps a lease
    async with runtime.transaction() as session:
        for run_id, lease_owner in ((owned, owner), (released, None), (taken, "other-worker")):
            await session.execute(
                update(orm.Run)
                .where(orm.Run.id == run_id)
                .values(lease_owner=lease_owner, lease_expires_at=lease_owner and stamped)
            )
    renewer = LeaseRenewer(runtime, owner, LEASE_SECONDS)
    renewer.period = 0.1  # rounds every 0.1 s, the give-up far off
    executions = {run_id: asyncio.create_task(asyncio.sleep(DEADLINE)) for run_id in (owned, released, taken)}
    try:
        with renewal_statements(runtime) as renewals:
            for run_id, execution in executions.items():
                renewer.hold(run_id, execution, time.monotonic())
            await until(lambda: executions[taken].done(), "the taken-over execution to be stopped")
            await until(lambda: renewer.rounds >= 2, "a second round")
            await renewer.idle()
            assert renewals[0][1] == {owned, released, taken}
            assert renewer.held == {owned, released}
            assert executions[taken].cancelled()
            assert not executions[owned].done() and not executions[released].done()
            leases = await _leases(runtime, [owned, released, taken])
            assert leases[owned][0] == owner and leases[owned][1] != stamped  # renewed
            assert leases[released] == (None, None)
            assert leases[taken] == ("other-worker", stamped)
            # Dropped (its execution ended): never named by a renewal again.
            renewer.drop(owned, executions[owned])
            rounds = renewer.rounds
            renewals.clear()
            await until(lambda: renewer.rounds > rounds, "a round after the drop")
            await renewer.idle()
            assert renewals and all(ids == {released} for _at, ids in renewals)
    finally:
        await renewer.stop()
        for execution in executions.values():
            execution.cancel()
        await asyncio.gather(*executions.values(), return_exceptions=True)
    rounds = renewer.rounds
    await asyncio.sleep(0)
    assert renewer.rounds == rounds and renewer.held == frozenset()


async def test_short_runs_and_instant_answers_start_no_lease_task(settings: Settings) -> None:
    """Runs answered in their claim are never held; runs that end before a
    renewal is due cost no task, no timer of their own, no statement."""
    # A 60 s lease (its first renewal due after 20 s): the runs here end long
    # before it however loaded the machine; with 3 s (a round after 1 s) a
    # loaded CI's run_until_idle outlasted the first round.
    async with runtime_with_lease(settings, 60.0) as runtime:
        worker = Worker(runtime, concurrency=4)
        held: list[str] = []
        hold = worker.leases.hold

        def recording_hold(run_id: str, execution: asyncio.Task[None], stamped_at: float) -> None:
            held.append(run_id)
            hold(run_id, execution, stamped_at)

        worker.leases.hold = recording_hold  # type: ignore[method-assign]
        instant = await _make_runs(runtime, 4, text="hi")
        streamed = await _make_runs(runtime, 4, text="[[delay 1]] hello there")  # streamed: 2 ms
        try:
            with renewal_statements(runtime) as renewals:
                async with asyncio.timeout(DEADLINE):
                    await worker.run_until_idle()
            renewal_tasks = [task for task in asyncio.all_tasks() if task.get_name() == "lease renewal"]
        finally:
            await worker.stop()
        assert set((await _statuses(runtime, instant + streamed)).values()) == {"completed"}
    assert sorted(held) == sorted(streamed)  # instant answers never registered
    assert worker.leases.held == frozenset() and worker.leases.rounds == 0 and renewals == []
    assert renewal_tasks == []


async def test_renewals_go_on_through_the_drain_and_stop_with_the_worker(runtime: Runtime) -> None:
    worker, task = await _worker_renewing_every_second(runtime)
    worker.drain_seconds = 600.0  # far longer than the test may take
    with renewal_statements(runtime) as renewals:
        (run_id,) = await _make_runs(runtime, 1, text="[[delay 100]] [[tokens 40]]")  # 4 s: several 1 s rounds
        await until(lambda: worker.busy == 1, "the run to start")
        worker.request_stop()
        stop_requested = time.time()
        async with asyncio.timeout(DEADLINE):
            await task
        rounds = worker.leases.rounds
    assert (await _statuses(runtime, [run_id]))[run_id] == "completed"
    assert any(at > stop_requested and ids == {run_id} for at, ids in renewals)  # renewed while draining
    assert worker.leases.rounds == rounds and worker.leases.held == frozenset()
    assert await _leases(runtime, [run_id]) == {run_id: (None, None)}


async def test_a_lapsed_lease_of_a_run_this_worker_executes_is_renewed_not_claimed_again(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lease that lapsed under its own worker's execution (renewals that
    came too late) is stamped again by the next round; this worker's claims
    leave the run out meanwhile (run_execution's ``executing``), so one
    execution goes on, never a second one beside it. The renewals are held
    from before the lapse until a claim after it has ended, so that claim
    always meets the lapsed lease (however late the loop's timers)."""
    real_claim = execute.claim_and_start
    lapsed_at = [float("inf")]
    claims_after_lapse: list[float] = []
    renewals_free, renewal_held = asyncio.Event(), asyncio.Event()
    renewals_free.set()

    async def claim_and_start(*args: Any, **kwargs: Any) -> Any:
        started_at = time.time()
        claimed = await real_claim(*args, **kwargs)
        if started_at > lapsed_at[0]:
            claims_after_lapse.append(started_at)
        return claimed

    monkeypatch.setattr(execute, "claim_and_start", claim_and_start)
    worker, task = await _worker_renewing_every_second(runtime)
    real_renew_all = worker.leases._renew_all

    async def renew_all() -> None:
        # Held before its transaction: on SQLite a round held inside it
        # would hold this process's write lock, and the lapse and the
        # claims would queue behind it until its attempt was cut off.
        if not renewals_free.is_set():
            renewal_held.set()
            await renewals_free.wait()
        await real_renew_all()

    monkeypatch.setattr(worker.leases, "_renew_all", renew_all)
    try:
        (run_id,) = await _make_runs(runtime, 1, text=LONG_RUN)
        await until(lambda: worker.busy == 1, "the run to start")
        first = worker._tasks[run_id]
        renewals_free.clear()
        # No round in flight but one held: a round already past the gate ends
        # (committed) before the lapse is written, never after it.
        idle, held = asyncio.ensure_future(worker.leases.idle()), asyncio.ensure_future(renewal_held.wait())
        done, pending = await asyncio.wait({idle, held}, timeout=DEADLINE, return_when=asyncio.FIRST_COMPLETED)
        for waiting in pending:
            waiting.cancel()
        assert done, "the renewals to be held"
        async with runtime.transaction() as session:  # lapsed, as unrenewed leases do
            lapse = update(orm.Run).where(orm.Run.id == run_id).values(lease_expires_at=time.time() - 1)
            await session.execute(lapse)
        lapsed_at[0] = time.time()
        await until(lambda: claims_after_lapse, "a claim (every 0.05 s) after the lapse")
        assert ((await _leases(runtime, [run_id]))[run_id][1] or 0) < lapsed_at[0]  # still lapsed after it
        renewals_free.set()
        await until(lambda: _renewed_since(runtime, run_id, time.time()), "a renewal to stamp it again")
        assert worker._tasks[run_id] is first and not first.done() and worker.busy == 1
        assert (await _leases(runtime, [run_id]))[run_id][0] == worker.owner
    finally:
        renewals_free.set()
        await stop_worker(worker, task)


async def _held_run(runtime: Runtime, owner: str) -> str:
    """A run in ``owner``'s lease, as a claim leaves it."""
    (run_id,) = await _make_runs(runtime, 1, status="in_progress")
    async with runtime.transaction() as session:
        stamp = update(orm.Run).where(orm.Run.id == run_id).values(lease_owner=owner, lease_expires_at=time.time() + 60)
        await session.execute(stamp)
    return run_id


def _with_transaction(runtime: Runtime, monkeypatch: pytest.MonkeyPatch, after_body: Callable[[], Any]) -> None:
    """Every transaction of ``runtime`` awaits ``after_body()`` after its
    statements, before its COMMIT (a slow, hanging or failing commit)."""
    real = runtime.transaction

    @asynccontextmanager
    async def transaction() -> AsyncIterator[AsyncSession]:
        async with real() as session:
            yield session
            await after_body()

    monkeypatch.setattr(runtime, "transaction", transaction)


async def _cancel(execution: asyncio.Task[None]) -> None:
    execution.cancel()
    await asyncio.gather(execution, return_exceptions=True)


async def test_a_renewal_with_a_slow_commit_counts_from_before_its_statement(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease in the database runs from before the renewal's UPDATE was
    sent: the renewer counts from no later, and only once it committed (a
    commit that takes long, counted from its end, would make it believe the
    lease runs longer than it does, and give the run up only after another
    worker may have taken it over)."""
    owner = "this-worker"
    run_id = await _held_run(runtime, owner)
    commits: list[float] = []

    async def slow_commit() -> None:
        await asyncio.sleep(0.3)
        commits.append(time.monotonic())

    _with_transaction(runtime, monkeypatch, slow_commit)
    renewer = LeaseRenewer(runtime, owner, LEASE_SECONDS)
    renewer.period = 0.05  # a round at once; attempts of 5 s, the give-up far off
    execution = asyncio.create_task(asyncio.sleep(DEADLINE))
    statements: list[float] = []

    def before(_connection: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if " ".join(statement.split()).startswith("UPDATE runs SET lease_expires_at"):
            statements.append(time.monotonic())

    engine = runtime.engine.sync_engine
    event.listen(engine, "before_cursor_execute", before)
    try:
        held_at = time.monotonic()
        renewer.hold(run_id, execution, held_at)
        await until(lambda: commits, "a renewal to commit")
        await renewer.idle()
        renewed_at = renewer.renewed_at(run_id)
        # The statement of the attempt that committed (an earlier attempt
        # may have been cut off by its time limit on a loaded machine).
        committed_statement = max(at for at in statements if at < commits[0])
        assert renewed_at is not None and held_at < renewed_at <= committed_statement < commits[0]
        assert (await _leases(runtime, [run_id]))[run_id][0] == owner and not execution.done()
    finally:
        event.remove(engine, "before_cursor_execute", before)
        await renewer.stop()
        await _cancel(execution)


async def test_a_renewal_whose_commit_fails_is_not_counted(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Its UPDATE ran, its COMMIT failed (the connection dropped): the lease
    still counts from the claim, and the renewer goes on retrying."""
    owner = "this-worker"
    run_id = await _held_run(runtime, owner)
    failed: list[float] = []

    async def failing_commit() -> None:
        failed.append(time.monotonic())
        raise RuntimeError("the connection dropped")

    _with_transaction(runtime, monkeypatch, failing_commit)
    renewer = LeaseRenewer(runtime, owner, LEASE_SECONDS)
    renewer.period = 0.05
    execution = asyncio.create_task(asyncio.sleep(DEADLINE))
    try:
        with caplog.at_level(logging.WARNING, logger="app.worker"):
            held_at = time.monotonic()
            renewer.hold(run_id, execution, held_at)
            await until(lambda: len(failed) >= 2, "two renewals to fail at their commit")
            await renewer.idle()
        assert renewer.renewed_at(run_id) == held_at
        assert not execution.done()  # retried, not given up: far from the lease's end
    finally:
        await renewer.stop()
        await _cancel(execution)
    assert f"renewing the lease of run {run_id} failed (the connection dropped); retrying" in caplog.text


@pytest.mark.parametrize("failure", ["hangs", "fails at once"])
async def test_failing_renewals_are_cut_off_and_the_run_stopped_before_its_lease_lapses(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    """Every attempt hangs (a lock or a pool that never answers) or fails at
    once (the database is down): a hanging one is cut off well within the
    lease, the renewer lives on, and the execution is stopped at
    GIVE_UP_FRACTION of the lease by a round due then, before the lease in
    the database lapses (not at the next period's round, which falls on the
    lapse, when another worker may already have claimed the run and asked
    the model again)."""
    owner = "this-worker"
    run_id = await _held_run(runtime, owner)
    hanging: list[float] = []

    async def hang() -> None:
        hanging.append(time.monotonic())
        if failure == "fails at once":
            raise RuntimeError("the database is down")
        await asyncio.Event().wait()

    _with_transaction(runtime, monkeypatch, hang)
    # Given up at 9 s, 1 s before the lapse: time for a loaded machine's late
    # timer and the cut-off attempt's rollback (0.3 s of a 3 s lease was not).
    lease_seconds = 10.0
    renewer = LeaseRenewer(runtime, owner, lease_seconds)
    execution = asyncio.create_task(asyncio.sleep(DEADLINE))
    stopped: list[float] = []
    execution.add_done_callback(lambda _task: stopped.append(time.monotonic()))
    try:
        with caplog.at_level(logging.WARNING, logger="app.worker"):
            held_at = time.monotonic()
            renewer.hold(run_id, execution, held_at)
            await until(execution.done, "the execution to be stopped")
            await renewer.idle()
    finally:
        await renewer.stop()
        await _cancel(execution)
    assert execution.cancelled() and renewer.held == frozenset()
    assert len(hanging) >= 2  # the first attempt was cut off, not waited for
    assert held_at + lease_seconds * 0.85 < stopped[0] < held_at + lease_seconds  # given up before the lapse
    why = "no answer within" if failure == "hangs" else "the database is down"
    assert f"renewing the lease of run {run_id} failed ({why}" in caplog.text
    assert f"lost the lease of run {run_id}; stopping its execution here" in caplog.text


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # this process's SQLite write lock
async def test_a_renewal_queued_for_the_write_lock_longer_than_an_attempt_still_renews(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A renewal waiting for this process's SQLite write lock (other
    transactions here at work) longer than an attempt's limit is not cut off
    there, only at the give-up moment: once the lock is free it renews, and
    the run goes on (cut off, a queue that stayed that slow gave runs up and
    had their model asked again elsewhere)."""
    # A 12 s lease renewed every second: attempts of 2 s, given up at 10.8 s.
    # The lock is held 2.4 s past the round's start, so the round must start
    # more than 2.4 s before its give-up moment: with a 3 s lease (0.6 s of
    # 2.7) a loaded CI's late round met the give-up and lost the run.
    async with runtime_with_lease(settings, 12.0) as runtime:
        worker, task = await running_worker(runtime)
        worker.leases.period = 1.0
        try:
            with caplog.at_level(logging.WARNING, logger="app.worker"):
                (run_id,) = await _make_runs(runtime, 1, text=LONG_RUN)
                await until(lambda: worker.busy == 1, "the run to start")
                rounds, claimed_at = worker.leases.rounds, worker.leases.renewed_at(run_id)
                async with runtime.transaction() as session:  # takes the write lock, and holds it
                    await session.execute(select(orm.Run.id).where(orm.Run.id == run_id))
                    await until(lambda: worker.leases.rounds > rounds, "a renewal round (queued for the lock)")
                    queued_at = time.monotonic()
                    limit = worker.leases.attempt_seconds
                    await until(lambda: time.monotonic() > queued_at + limit * 1.2, "more than an attempt's limit")
                await until(lambda: worker.leases.renewed_at(run_id) != claimed_at, "the queued renewal")
            assert worker.busy == 1 and worker.leases.held == {run_id}
        finally:
            await stop_worker(worker, task)
    assert "renewing the lease" not in caplog.text and "lost the lease" not in caplog.text


async def test_a_lease_near_its_give_up_gets_an_attempt_first(runtime: Runtime) -> None:
    """A claim that took most of the lease (its transaction queued for the
    write lock) leaves a lease near its give-up moment when the run is held:
    the first round comes early enough for a whole attempt before that
    moment, rather than at it, stopping a run whose renewal would have
    worked."""
    owner = "this-worker"
    run_id = await _held_run(runtime, owner)
    # A 30 s lease: give-up at 27 s, attempts of 5 s, rounds every 10 s. (With
    # 12 s, attempts of 2 s: a loaded CI's renewal could miss its limit.)
    renewer = LeaseRenewer(runtime, owner, lease_seconds=30.0)
    execution = asyncio.create_task(asyncio.sleep(DEADLINE))
    try:
        # The claim was sent 20 s ago: its give-up is 7 s away, before the
        # next period's round; the first round comes 5 s (an attempt) before
        # it, 2 s from now (2 s for a late hold() on a loaded machine).
        stamped_at = time.monotonic() - 20.0
        renewer.hold(run_id, execution, stamped_at)
        await until(lambda: renewer.renewed_at(run_id) != stamped_at or execution.done(), "a round")
        assert not execution.done() and renewer.held == {run_id}
    finally:
        await renewer.stop()
        await _cancel(execution)


def test_the_renewer_on_uvloop(settings: Settings) -> None:
    """The server's loop is uvloop when installed (settings.event_loop; the
    tests run on asyncio's): the renewer's timers and time limits there
    too. A round renews; then, its commits failing, the run is given up
    before its lease lapses."""

    async def scenario() -> None:
        runtime = await Runtime.start(settings)
        real = runtime.transaction
        failing = False

        @asynccontextmanager
        async def transaction() -> AsyncIterator[AsyncSession]:
            async with real() as session:
                yield session
                if failing:
                    raise RuntimeError("the connection dropped")

        runtime.transaction = transaction  # type: ignore[method-assign]
        owner = "this-worker"
        run_id = await _held_run(runtime, owner)
        # A 12 s lease: attempts of 2 s, given up at 10.8 s (1.2 s for a late
        # timer on a loaded machine; 0.3 s of a 3 s lease was too little).
        renewer = LeaseRenewer(runtime, owner, lease_seconds=12.0)
        renewer.period = 0.05  # the first renewal at once
        execution = asyncio.create_task(asyncio.sleep(DEADLINE))
        stopped: list[float] = []
        execution.add_done_callback(lambda _task: stopped.append(time.monotonic()))
        try:
            held_at = time.monotonic()
            renewer.hold(run_id, execution, held_at)
            await until(lambda: renewer.renewed_at(run_id) != held_at, "a renewal")
            renewed_at = renewer.renewed_at(run_id)
            assert renewed_at is not None
            failing = True
            await until(execution.done, "the execution to be stopped")
            await renewer.idle()
        finally:
            await renewer.stop()
            await _cancel(execution)
            await runtime.close()
        assert execution.cancelled() and stopped[0] < renewed_at + 12.0

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)  # a checkout there may wait on the server
async def test_a_renewal_whose_checkout_hangs_on_postgres_is_cut_off_at_the_attempts_limit(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL a renewal's connection may have to be opened, or an
    idle one pinged (a server gone silent after a failover): that wait is
    bounded by an attempt's limit, so later rounds on a fresh connection
    still get their try before the give-up (only SQLite's local write lock
    is waited for up to the give-up moment)."""
    owner = "this-worker"
    run_id = await _held_run(runtime, owner)
    checkouts: list[float] = []
    real = runtime.transaction

    @asynccontextmanager
    async def transaction() -> AsyncIterator[AsyncSession]:
        async with real() as session:

            async def connection(**_kwargs: Any) -> Any:
                checkouts.append(time.monotonic())
                await asyncio.Event().wait()  # the server never answers

            monkeypatch.setattr(session, "connection", connection)
            yield session

    monkeypatch.setattr(runtime, "transaction", transaction)
    # A 6 s lease: attempts of 1 s, rounds at 2 s and (after the cut-off
    # first) 4.4 s, the give-up at 5.4 s: 1 s for the second round to be late.
    renewer = LeaseRenewer(runtime, owner, lease_seconds=6.0)
    execution = asyncio.create_task(asyncio.sleep(DEADLINE))
    try:
        renewer.hold(run_id, execution, time.monotonic())
        await until(execution.done, "the execution to be given up")
    finally:
        await renewer.stop()
        await _cancel(execution)
    assert len(checkouts) >= 2  # the first checkout was cut off at the attempt's limit, not at the give-up
