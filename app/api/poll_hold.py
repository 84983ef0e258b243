"""The SDK poller's held GET of a run (issue 17): answered once the run stops
instead of after the poller's sleep-and-retry rounds, for as long as this
process's bus is sure to carry the run's stopping event.

A run's stopping event (terminal, or requires_action) is published by the
process that makes it: the one whose worker executes the run, or, for a run
nobody executes, the one that handled its cancel or whose reaper expired it.
So the hold lasts while the run is this process's to execute, as its row
says: its worker holds the lease, or the run is queued and reserved for that
worker. Once a reservation lapses, or for a queued run reserved for nobody,
any process's worker may claim the run; the hold then reads the row again
after ``RECHECK_SECONDS``, then after twice as long each time (up to
``RECHECK_MAX_SECONDS``), and answers that read once another process has it
(with ``serve --workers 2``, a run that waited past its reservation and was
claimed by the other process kept its creator's poll waiting the whole
``poll_hold_ms``). A stopping event published by another process (its
cancel of a run nobody executes) is not heard here: the row tells at the
hold's next read.

A run this process's API created for its own worker (reserved for it) needs
no read at all while it has not stopped here: ``Runtime.created_runs``
(app/created_runs.py) keeps its thread and project from the create until its
stopping event is published, which is what the read would have told (issue
17: nine in ten of the SDK's polls under 16 clients came before the run
stopped, each with a read, a round trip on PostgreSQL).
"""

from __future__ import annotations

import asyncio
import math
import time

from app import created_runs
from app.runtime import Runtime
from app.services import run_execution, runs
from app.services.projects import Project
from app.wire.events import FINAL_RUN_EVENTS, TERMINAL_RUN_EVENTS, Event
from app.wire.runs import Run

# Statuses an SDK poller keeps polling through (wire notes 6.2).
STILL_RUNNING = frozenset({"queued", "in_progress", "cancelling"})

# How long a hold first trusts a run that any process may claim (queued,
# its reservation lapsed or never made) before reading its row again, twice
# as long at each such read after: a poll of a run another process took
# waits at most about as long again as the run waited unclaimed, and one of
# a run waiting for a slot all along reads its row 4 times in a hold of 1 s
# (the hold that trusted every queued run read it twice, and could wait
# the whole hold for nothing). The same interval as a created run's grace.
RECHECK_SECONDS = created_runs.GRACE_SECONDS

# The longest a hold trusts such a run between reads: with ``serve
# --workers 2`` 4 of 1526 runs took over 0.9 s while a doubled interval
# delayed noticing that the other process had taken them.
RECHECK_MAX_SECONDS = 0.5


def note_created(
    runtime: Runtime, project: Project, run_id: str, thread_id: str, lease_owner: str | None, until: float | None
) -> None:
    """Before the commit of a run created by a request that will poll it
    (not streamed), so that no stopping event can come before the note:
    remembered if it is reserved for this process's worker. A commit that
    fails leaves a note nobody asks for, forgotten once its reservation
    lapses."""
    worker = runtime.worker
    if worker is not None and until is not None and lease_owner == run_execution.reserved_for(worker.owner):
        runtime.created_runs.add(run_id, project.id, thread_id, until, worker.executes)


def trusted_for(runtime: Runtime, run: runs.RunRow, now: float, recheck: float) -> tuple[float | None, float]:
    """For how many seconds from ``now`` (``time.time()``) this process's bus
    surely carries the run's stopping event, as its row says: ``inf`` while
    this worker holds its lease, the rest of a reservation for this worker,
    ``recheck`` for a queued run any worker may claim; None when it is
    another process's (its lease or its live reservation) or there is no
    worker here. With it the interval for the next such read: doubled, up to
    ``RECHECK_MAX_SECONDS``, only after a read answered ``recheck``."""
    worker = runtime.worker
    if worker is None:
        return None, recheck
    if run.lease_owner == worker.owner:
        return math.inf, recheck
    lease_live = run.lease_owner is not None and (run.lease_expires_at or 0.0) > now
    if run.status != "queued":
        return None, recheck  # executed (or cancelled) under another's lease, or by nobody live
    if run.lease_owner == run_execution.reserved_for(worker.owner) and lease_live:
        return max((run.lease_expires_at or 0.0) - now, 0.0), recheck
    if lease_live:
        return None, recheck  # reserved for another process's worker
    return recheck, min(recheck * 2, RECHECK_MAX_SECONDS)


async def retrieve_when_stopped(runtime: Runtime, project: Project, thread_id: str, run_id: str) -> Run | str:
    """The run once it stops, or after ``poll_hold_ms``, or once it is no
    longer this process's to execute: the run, or the JSON text of the
    stopping event that carries it (the committed run as a GET renders it,
    already encoded for the run's log: answered as it is). Watching before
    reading, so an event published in between is not missed; no connection
    is held while waiting. A bus watch, not a subscription: the run's
    deltas go by in the publisher's call, one name compared each, where a
    subscriber's queue woke this task for every streamed token (issue 17)."""
    hold_until = time.monotonic() + runtime.settings.poll_hold_ms / 1000
    stopped: asyncio.Future[Event] = asyncio.get_running_loop().create_future()

    def on_event(event: Event) -> None:
        if event.name in TERMINAL_RUN_EVENTS and isinstance(event.data, dict) and not stopped.done():
            stopped.set_result(event)

    with runtime.bus.watch(run_id, on_event):
        # Watching: a stopping event published from here on is heard, one
        # published before has made ``created_runs`` forget the run.
        worker = runtime.worker
        trusted = (
            None
            if worker is None
            else runtime.created_runs.trusted_for(worker.executes, project.id, thread_id, run_id, time.time())
        )
        recheck = RECHECK_SECONDS
        while True:
            if trusted is None:
                async with runtime.poll_read() as connection:
                    run = await runs.get_row(connection, project, thread_id, run_id)
                if run.status in STILL_RUNNING:
                    trusted, recheck = trusted_for(runtime, run, time.time(), recheck)
                else:
                    trusted = None
                if trusted is None or hold_until <= time.monotonic():
                    return runs.to_wire(run)
            left = hold_until - time.monotonic()
            # (asyncio.wait: a timeout leaves ``stopped`` as it is, to be waited on again.)
            await asyncio.wait((stopped,), timeout=min(trusted, left))
            if not stopped.done():
                trusted = None  # read the row again: stopped, another's, or still ours
                continue
            event = stopped.result()
            if runtime.worker is not None and event.name not in FINAL_RUN_EVENTS:
                # Stopped for tool outputs: the executor publishes just
                # before its task ends, and a submit's hand-back to this
                # worker (Worker.hand) must find the task gone. An ended
                # run is answered at once: the worker counts it no more
                # (Worker.executing; issue 17: no wait for the task's last
                # step before the answer).
                await runtime.worker.wait_until_released(run_id)
            return event.json
