"""Claim affinity (issue 17): a run created through a process's API is kept
for that process's worker for a moment; other workers claim it once the
reservation lapses, so a creator that died leaves nothing unclaimed."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import update

from app import orm
from app.runtime import Runtime
from app.services import run_execution
from app.worker import Worker
from tests.runner.test_worker import _make_runs

pytestmark = pytest.mark.timeout(30)


async def _reserve(runtime: Runtime, run_id: str, reservation: run_execution.Reservation) -> None:
    async with runtime.transaction() as session:
        await session.execute(
            update(orm.Run)
            .where(orm.Run.id == run_id)
            .values(lease_owner=reservation.owner, lease_expires_at=reservation.until)
        )


async def test_a_reserved_run_is_claimed_by_its_worker_and_by_others_only_once_the_reservation_lapses(
    runtime: Runtime,
) -> None:
    creator, other = Worker(runtime), Worker(runtime)
    kept, lapsing = await _make_runs(runtime, 2)
    await _reserve(
        runtime, kept, run_execution.Reservation(run_execution.reserved_for(creator.owner), time.time() + 60)
    )
    # A creator that died right after creating the run: nobody renews anything.
    # Its reservation runs while the claims below are made, then is made to
    # lapse (set into the past, not waited for: with one of 0.3 s, a loaded
    # machine's three claims outlasted it).
    gone = run_execution.reserved_for("gone:1:0")
    await _reserve(runtime, lapsing, run_execution.Reservation(gone, time.time() + 60))

    assert await other.claim(5) == []  # both reserved for someone else
    assert await creator.claim(5) == [kept]  # its own, at once, however long the reservation runs
    assert await other.claim(5) == []  # not before the reservation lapses
    await _reserve(runtime, lapsing, run_execution.Reservation(gone, time.time() - 1))
    assert await other.claim(5) == [lapsing]


async def test_a_worker_reserves_only_what_it_has_room_for(runtime: Runtime) -> None:
    worker = Worker(runtime, concurrency=2)
    first, second = worker.reservation(), worker.reservation()
    assert first is not None and second is not None
    assert first.owner == run_execution.reserved_for(worker.owner) and first.until > time.time()
    assert worker.reservation() is None  # two reserved, two slots: the next run is anyone's at once
    await worker.tick()  # a claim takes what was reserved: room again
    assert worker.reservation() is not None
    worker.request_stop()
    assert worker.reservation() is None  # a stopping worker keeps nothing


async def test_cancelling_a_reserved_run_cancels_it_at_once(runtime: Runtime) -> None:
    """A reservation is not a lease: nobody executes the run yet, so a cancel
    ends it rather than leaving it ``cancelling`` for an executor."""
    from app.services import runs
    from app.services.projects import Project

    (run_id,) = await _make_runs(runtime, 1)
    await _reserve(runtime, run_id, run_execution.Reservation(run_execution.reserved_for("x:1:0"), time.time() + 60))
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
        assert run is not None
        project = Project(id=orm.DEFAULT_PROJECT_ID, name="default")
        answer, events = await runs.cancel(session, project, run.thread_id, run_id)
    assert answer.status == "cancelling" and [event.name for event in events][-1] == "thread.run.cancelled"
