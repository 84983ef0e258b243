"""The SDK poller's held GET of a run (issue 17): answered once the run stops
instead of after the poller's sleep-and-retry rounds, for as long as this
process's bus is sure to carry the run's stopping event.

A run's stopping event (terminal, or requires_action) is published only in
the process whose worker executes it. So the hold lasts while the run is
this process's to execute, as its row says: its worker holds the lease, or
the run is queued and reserved for that worker. Once a reservation lapses,
or for a queued run reserved for nobody, any process's worker may claim the
run; the hold then reads the row again every ``RECHECK_SECONDS`` and answers
that read once another process has it (with ``serve --workers 2``, a run
that waited past its reservation and was claimed by the other process kept
its creator's poll waiting the whole ``poll_hold_ms``).
"""

from __future__ import annotations

import asyncio
import math
import time

from app.runtime import Runtime
from app.services import run_execution, runs
from app.services.projects import Project
from app.wire.events import TERMINAL_RUN_EVENTS
from app.wire.runs import Run

# Statuses an SDK poller keeps polling through (wire notes 6.2).
STILL_RUNNING = frozenset({"queued", "in_progress", "cancelling"})

# How long a hold trusts a run that any process may claim (queued, its
# reservation lapsed or never made) before reading its row again: a read per
# interval only while such a run waits, and at most this much of a poll's
# time spent waiting on a run another process took.
RECHECK_SECONDS = 0.25


def trusted_for(runtime: Runtime, run: runs.RunRow, now: float) -> float | None:
    """For how many seconds from ``now`` (``time.time()``) this process's bus
    surely carries the run's stopping event, as its row says: ``inf`` while
    this worker holds its lease, the rest of a reservation for this worker,
    ``RECHECK_SECONDS`` for a queued run any worker may claim; None when it
    is another process's (its lease or its live reservation) or there is no
    worker here."""
    worker = runtime.worker
    if worker is None:
        return None
    if run.lease_owner == worker.owner:
        return math.inf
    lease_live = run.lease_owner is not None and (run.lease_expires_at or 0.0) > now
    if run.status != "queued":
        return None  # executed (or cancelled) under another's lease, or by nobody live
    if run.lease_owner == run_execution.reserved_for(worker.owner) and lease_live:
        return max((run.lease_expires_at or 0.0) - now, 0.0)
    if lease_live:
        return None  # reserved for another process's worker
    return RECHECK_SECONDS


async def retrieve_when_stopped(runtime: Runtime, project: Project, thread_id: str, run_id: str) -> Run:
    """The run once it stops, or after ``poll_hold_ms``, or once it is no
    longer this process's to execute. Subscribed before reading, so an
    event published in between is not missed; no connection is held while
    waiting. The stopping event carries the committed run as a GET would
    render it, so it is answered without reading the row again."""
    hold_until = time.monotonic() + runtime.settings.poll_hold_ms / 1000
    async with runtime.bus.subscribe(run_id) as events:
        while True:
            async with runtime.poll_read() as connection:
                run = await runs.get_row(connection, project, thread_id, run_id)
            trusted = trusted_for(runtime, run, time.time()) if run.status in STILL_RUNNING else None
            left = hold_until - time.monotonic()
            if trusted is None or left <= 0:
                return runs.to_wire(run)
            try:
                async with asyncio.timeout(min(trusted, left)):
                    while True:
                        event = await events.get()
                        if event.name in TERMINAL_RUN_EVENTS and isinstance(event.data, dict):
                            if runtime.worker is not None:
                                # The executor publishes just before its task
                                # ends: answer once the worker counts the run
                                # as done too.
                                await runtime.worker.wait_until_released(run_id)
                            return Run.model_validate(event.data)
            except TimeoutError:
                pass  # read the row again: stopped, another's, or still ours
