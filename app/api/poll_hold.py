"""The SDK poller's held GET of a run (issue 17): answered once the run stops
instead of after the poller's sleep-and-retry rounds, for as long as this
process's bus is sure to carry the run's stopping event.

A run's stopping event (terminal, or requires_action) is published only in
the process whose worker executes it. So the hold lasts while the run is
this process's to execute, as its row says: its worker holds the lease, or
the run is queued and reserved for that worker. Once a reservation lapses,
or for a queued run reserved for nobody, any process's worker may claim the
run; the hold then reads the row again after ``RECHECK_SECONDS``, then
after twice as long each time, and answers that read once another process
has it (with ``serve --workers 2``, a run
that waited past its reservation and was claimed by the other process kept
its creator's poll waiting the whole ``poll_hold_ms``).

A run this process's API created for its own worker (reserved for it) needs
no read at all while it has not stopped here: ``Created`` keeps its thread
and project from the create until its stopping event is published, which
is what the read would have told (issue 17: nine in ten of the SDK's polls
under 16 clients came before the run stopped, each with a read, a round
trip on PostgreSQL).
"""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass

from app.bus import EventBus
from app.runtime import Runtime
from app.services import run_execution, runs
from app.services.projects import Project
from app.wire.events import TERMINAL_RUN_EVENTS, Event
from app.wire.runs import Run

# Statuses an SDK poller keeps polling through (wire notes 6.2).
STILL_RUNNING = frozenset({"queued", "in_progress", "cancelling"})

# How long a hold first trusts a run that any process may claim (queued,
# its reservation lapsed or never made) before reading its row again, twice
# as long at each read after: a poll of a run another process took waits at
# most about as long again as the run waited unclaimed, and one of a run
# waiting for a slot all along reads its row 4 times in a hold of 1 s
# (the hold that trusted every queued run read it twice, and could wait
# the whole hold for nothing).
RECHECK_SECONDS = 0.25


# A run created here is forgotten this long after its create if it never
# stopped here (another process executed it, or this one stopped first).
FORGET_AFTER_SECONDS = 600.0


@dataclass(frozen=True)
class _Creation:
    project_id: str
    thread_id: str
    reserved_until: float  # time.time() when other workers may claim it
    created: float  # time.monotonic()


class Created:
    """Runs this process's API created, reserved for this process's worker,
    whose stopping event this process has not published yet (a tap on the
    bus forgets each at its stopping event, in the publisher's call)."""

    def __init__(self) -> None:
        self._runs: OrderedDict[str, _Creation] = OrderedDict()

    def add(self, run_id: str, project_id: str, thread_id: str, reserved_until: float) -> None:
        now = time.monotonic()
        while self._runs:  # oldest first: those that never stopped here
            oldest = next(iter(self._runs.values()))
            if now - oldest.created < FORGET_AFTER_SECONDS:
                break
            self._runs.popitem(last=False)
        self._runs[run_id] = _Creation(project_id, thread_id, reserved_until, now)

    def tap(self, topic: str, events: list[Event]) -> None:
        if topic in self._runs and any(event.name in TERMINAL_RUN_EVENTS for event in events):
            del self._runs[topic]

    def trusted_for(self, runtime: Runtime, project: Project, thread_id: str, run_id: str, now: float) -> float | None:
        """As ``trusted_for`` would answer from the run's row, for a run
        created here and not stopped here; None when the row must be read
        (not created here, another project's or thread's, stopped, or its
        reservation lapsed ``RECHECK_SECONDS`` ago, not claimed here)."""
        creation = self._runs.get(run_id)
        worker = runtime.worker
        if creation is None or worker is None:
            return None
        if creation.project_id != project.id or creation.thread_id != thread_id:
            return None  # the read words the miss
        if worker.executes(run_id):
            return math.inf
        # This worker claims the runs reserved for it first, lapsed or not:
        # one whose reservation lapsed a moment ago is most likely still
        # about to be claimed here (a loaded event loop), so the note is
        # trusted for one recheck interval more before the row is read.
        trusted_until = creation.reserved_until + RECHECK_SECONDS
        return trusted_until - now if trusted_until > now else None


# One per event bus (a runtime's), without a field of the runtime's own.
_CREATED: weakref.WeakKeyDictionary[EventBus, Created] = weakref.WeakKeyDictionary()


def created(bus: EventBus) -> Created:
    found = _CREATED.get(bus)
    if found is None:
        found = _CREATED[bus] = Created()
        bus.taps.append(found.tap)
    return found


def note_created(
    runtime: Runtime, project: Project, run_id: str, thread_id: str, lease_owner: str | None, until: float | None
) -> None:
    """After the commit of a run created by a request that will poll it
    (not streamed): remembered if it is reserved for this process's worker."""
    worker = runtime.worker
    if worker is not None and until is not None and lease_owner == run_execution.reserved_for(worker.owner):
        created(runtime.bus).add(run_id, project.id, thread_id, until)


def trusted_for(runtime: Runtime, run: runs.RunRow, now: float, recheck: float) -> float | None:
    """For how many seconds from ``now`` (``time.time()``) this process's bus
    surely carries the run's stopping event, as its row says: ``inf`` while
    this worker holds its lease, the rest of a reservation for this worker,
    ``recheck`` for a queued run any worker may claim; None when it
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
    return recheck


async def retrieve_when_stopped(runtime: Runtime, project: Project, thread_id: str, run_id: str) -> Run | str:
    """The run once it stops, or after ``poll_hold_ms``, or once it is no
    longer this process's to execute: the run, or the JSON text of the
    stopping event that carries it (the committed run as a GET renders it,
    already encoded for the run's log: answered as it is). Subscribed
    before reading, so an event published in between is not missed; no
    connection is held while waiting."""
    hold_until = time.monotonic() + runtime.settings.poll_hold_ms / 1000
    async with runtime.bus.subscribe(run_id) as events:
        # Subscribed: a stopping event published from here on is heard, one
        # published before has made ``created`` forget the run.
        trusted = created(runtime.bus).trusted_for(runtime, project, thread_id, run_id, time.time())
        recheck = RECHECK_SECONDS
        while True:
            if trusted is None:
                async with runtime.poll_read() as connection:
                    run = await runs.get_row(connection, project, thread_id, run_id)
                trusted = trusted_for(runtime, run, time.time(), recheck) if run.status in STILL_RUNNING else None
                recheck *= 2
                if trusted is None or hold_until <= time.monotonic():
                    return runs.to_wire(run)
            left = hold_until - time.monotonic()
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
                            return event.json
            except TimeoutError:
                trusted = None  # read the row again: stopped, another's, or still ours
