"""Runs this process's API created for its own worker (reserved for it), noted
for the SDK's held poll that follows the create (app/api/poll_hold.py): while
such a run has not stopped here, the poll needs no read of its row to know
its thread and project and that this process's bus will carry its stopping
event (issue 17).

One ``CreatedRuns`` per Runtime (ARCHITECTURE §9: no module-level state); a
tap on the runtime's bus forgets each run at its stopping event.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from app.wire.events import TERMINAL_RUN_EVENTS, Event

# How long a note outlives its run's reservation when this worker has not
# claimed the run: it claims the runs reserved for it first, so one whose
# reservation lapsed a moment ago is most likely still about to be claimed
# here (a loaded event loop). Past that any process's worker may have it,
# and only its row can tell: the note is of no more use and is forgotten.
GRACE_SECONDS = 0.25

# A run this worker executes keeps its note until its stopping event; this
# long after the create it is forgotten anyway (a stopping event this
# process never published: a lease lost to another process).
EXECUTING_LIMIT_SECONDS = 3600.0

# Whether this process's worker executes a run (Worker.executes).
Executes = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class _Creation:
    project_id: str
    thread_id: str
    reserved_until: float  # time.time() when other workers may claim it
    created: float  # time.monotonic()


class CreatedRuns:
    def __init__(self) -> None:
        # In creation order, so in ``reserved_until`` order but for the runs
        # moved to the end while this worker executes them.
        self._runs: OrderedDict[str, _Creation] = OrderedDict()

    def __len__(self) -> int:
        return len(self._runs)

    def add(self, run_id: str, project_id: str, thread_id: str, reserved_until: float, executes: Executes) -> None:
        self._prune(time.time(), time.monotonic(), executes)
        self._runs[run_id] = _Creation(project_id, thread_id, reserved_until, time.monotonic())

    def _prune(self, now: float, monotonic: float, executes: Executes) -> None:
        """Forget, from the oldest, the notes past their reservation and
        grace that this worker does not execute (another process claimed the
        run, it was cancelled elsewhere, its thread deleted). One this worker
        executes goes to the end, to be looked at again once the notes ahead
        of it have lapsed; each note is looked at once per call at most."""
        for _ in range(len(self._runs)):
            run_id, oldest = next(iter(self._runs.items()))
            if oldest.reserved_until + GRACE_SECONDS > now:
                return
            if executes(run_id) and monotonic - oldest.created < EXECUTING_LIMIT_SECONDS:
                self._runs.move_to_end(run_id)
            else:
                del self._runs[run_id]

    def tap(self, topic: str, events: list[Event]) -> None:
        """The bus's tap: a run that stopped here needs a read again."""
        if topic in self._runs and any(event.name in TERMINAL_RUN_EVENTS for event in events):
            del self._runs[topic]

    def trusted_for(self, executes: Executes, project_id: str, thread_id: str, run_id: str, now: float) -> float | None:
        """For how many seconds from ``now`` (``time.time()``) this process's
        bus surely carries the stopping event of a run created here, not
        stopped here, on this thread of this project: ``inf`` while this
        worker executes it, else the rest of its reservation and grace. None
        when only its row can tell (not noted, another project's or thread's:
        the read words the miss; or lapsed, then forgotten)."""
        creation = self._runs.get(run_id)
        if creation is None or creation.project_id != project_id or creation.thread_id != thread_id:
            return None
        if executes(run_id):
            return math.inf
        trusted_until = creation.reserved_until + GRACE_SECONDS
        if trusted_until > now:
            return trusted_until - now
        del self._runs[run_id]
        return None
