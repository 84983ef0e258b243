"""The worker: claims runs and executes them; reaps runs nobody can finish.

The row is the job. A claim is a compare-and-set UPDATE that stamps a lease
(services/run_execution.py); the worker's one lease renewer renews the
leases of all its executing runs while they work (lease_renewer.py).
A run whose lease lapsed (or was released) while ``in_progress`` belonged to
a worker that crashed, was killed or shut down: the next claim RESUMES it
from its last committed step. Only a run that can no longer be resumed (past
its ``expires_at``) is failed, with a clear last_error.

The loop survives database errors (a dropped PostgreSQL connection, a SQLite
lock held past the busy timeout): it logs the first error of a streak, backs
off exponentially up to a cap and carries on; SQLAlchemy replaces the dead
connections. ``last_loop_at`` / ``last_error`` let /readyz tell a loop that
is not claiming. On shutdown it stops claiming, lets in-flight runs finish
within a drain timeout and releases the leases of the rest at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import socket
import time
from contextlib import suppress

from sqlalchemy.exc import DBAPIError

from app import db, orm
from app.activity import ACTIVITY
from app.lease_renewer import LeaseRenewer
from app.retrieval import ingest
from app.runner import execute
from app.runner.tools import registry
from app.runtime import Runtime
from app.services import run_defaults, run_events, run_execution, run_state, runs
from app.wire.events import FINAL_RUN_EVENTS, Event

log = logging.getLogger("app.worker")

INTERRUPTED = {
    "code": "server_error",
    "message": "The run was interrupted because the worker executing it stopped (crash or restart), "
    "and it could not be resumed before it expired. Create a new run to continue.",
}

# How often the worker looks for run event logs past their retention.
PRUNE_SECONDS = 60.0

# Turns of the event loop a hand-off lets go by before its transaction
# (Worker._take_handed): the create's response is written in them. Latency
# only: nothing depends on it for correctness (a response written later
# is as right).
_TURNS_BEFORE_HAND_OFF = 2

# First pause after a failed loop iteration; doubles up to the setting's cap.
FIRST_BACKOFF_SECONDS = 0.05


def _set_done(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


def _run_ended(_task: asyncio.Task[None]) -> None:
    ACTIVITY.runs -= 1


class Worker:
    def __init__(self, runtime: Runtime, *, concurrency: int | None = None) -> None:
        self.runtime = runtime
        settings = runtime.settings
        self.concurrency = concurrency or settings.worker_concurrency
        self.lease_seconds = settings.run_lease_seconds
        self.poll_seconds = settings.worker_poll_seconds
        self.max_backoff_seconds = settings.worker_max_backoff_seconds
        self.drain_seconds = settings.worker_drain_seconds
        self.owner = f"{socket.gethostname()[:32]}:{os.getpid()}:{secrets.token_hex(4)}"
        self._wakeup = asyncio.Event()
        self._next_reap = 0.0
        # The ingestion claim is a query of its own: made when a file was
        # queued (a wake with files) or once per poll interval, not on every
        # wake (each run wakes the worker twice; issue 17).
        self._files_queued = True
        self._next_ingestion = 0.0
        # The last claim filled every free slot: more runs may be waiting,
        # so a slot freed by a finished run is worth a claim at once.
        self._claimed_to_capacity = False
        self._next_prune = 0.0
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Runs whose final event has been published while their task winds
        # down (not executing: Worker.executing).
        self._ended: set[str] = set()
        self.leases = LeaseRenewer(runtime, self.owner, self.lease_seconds, on_given_up=self._given_up)
        self.affinity_seconds = settings.run_claim_affinity_seconds
        # Runs reserved for this worker since its last claim (reservation()).
        self._reserved = 0
        # Claims so far (each takes the runs reserved before it): a hand-off
        # gives its reservation back only if no claim has taken it meanwhile.
        self._claims = 0
        # The hand-offs in flight (hand(), prepare()), by run: at most one
        # that sends a statement of its own, so that such runs created
        # together are still claimed together by one tick (one claim and one
        # commit for many, where such a hand-off is a transaction per run);
        # any number of folded runs' (started by their creates: no statement).
        # A tick meanwhile leaves their runs out of its claim, as ones this
        # worker executes (a hand-off's failure wakes the worker again).
        self._handing: dict[str, asyncio.Task[None]] = {}
        # Each hand-off's claim count when it began (``_claims``): one begun
        # before the last claim is no longer among ``_reserved``, which that
        # claim counted anew, though its run takes a slot (reservation()).
        self._handing_since: dict[str, int] = {}
        # The gates of hand-offs begun before their create committed
        # (prepare()), by run, until hand() opens or dropped() closes them.
        self._gates: dict[str, asyncio.Future[None]] = {}
        # Folded runs' hand-offs (prepare()), by run: done once the run's
        # first model call has gone out (execute.open_first_call) or the
        # hand-off has ended without one; the create waits for it before
        # answering (answer_after()).
        self._calls_out: dict[str, asyncio.Future[None]] = {}
        # Every hand-off begun before its create (prepare()), by run: done
        # once the hand-off's statement goes (PostgreSQL's instant answer)
        # or at the first step of the run's task (a fold), or once the
        # hand-off has ended without either; a streamed create waits for it
        # before answering (answer_after()).
        self._under_way: dict[str, asyncio.Future[None]] = {}
        # run_forever() is going round: only then is a run handed (a worker
        # made but not started, or driven tick by tick, claims as before).
        self._looping = False
        # A tick is under way (its claim may take runs created meanwhile).
        self._ticking = False
        self.builtins = registry.builtin_tools(runtime)
        self.ingestion = ingest.Ingestion(runtime, self.owner, self.wake)
        # Heartbeat, read by /readyz: when the loop last went round, and the
        # error of the last iteration if it failed (None once one succeeds).
        self.last_loop_at: float = time.monotonic()
        self.last_error: str | None = None
        self._failures = 0
        self._unreleased: set[str] = set()
        # Runs a folded create (prepare()) may have committed in_progress,
        # leased to this worker, that it does not execute (the create's
        # outcome unknown to the API, or committed too late to run under its
        # lease): by run, until when that lease holds (time.time()). Each tick
        # releases them before its claim, again until released or lapsed (the
        # commit may land after a tick's release), for its claim to take them
        # as any resumable run, or the reaper to end a cancelled one.
        self._folded_unreleased: dict[str, float] = {}
        self._stopping = False
        self._abandon = asyncio.Event()  # a second stop request: skip the drain

    def wake(self, *, files: bool = True) -> None:
        """New work: runs, and with ``files`` vector store files to ingest."""
        if files:
            self._files_queued = True
        self._wakeup.set()

    @property
    def busy(self) -> int:
        """Runs with a task of this worker's, ended or not."""
        return len(self._tasks)

    @property
    def executing(self) -> int:
        """Runs this worker executes (the metric, /readyz): its tasks, less
        those whose run has ended (its final event published) and whose task
        only winds down. A held poll answers at that event (poll_hold), and
        its client reading the metric then sees the run counted no more."""
        return sum(1 for run_id in self._tasks if run_id not in self._ended)

    def reservation(self) -> run_execution.Reservation | None:
        """For a run this process's API is creating: keep it for this worker
        (which claims it at its next wake, in-process, so the run's stream
        and polls are answered from this process's bus), unless this worker
        has no slot for it; then any process may claim it at once."""
        # Folded runs' hand-offs are many at a time under load (prepare()),
        # and a claim meanwhile stops counting them among ``_reserved``.
        handing_uncounted = sum(1 for claims in self._handing_since.values() if claims != self._claims)
        taken = len(self._tasks) + self._reserved + handing_uncounted
        if self._stopping or self.affinity_seconds <= 0 or taken >= self.concurrency:
            return None
        self._reserved += 1
        until = time.time() + self.affinity_seconds
        return run_execution.Reservation(run_execution.reserved_for(self.owner), until, self._claims)

    def release(self, reservation: run_execution.Reservation) -> None:
        """A reservation() whose run was never written (its create refused
        with an API error): its slot is free again, for the
        lone-run rule (hand()) and the worker's capacity, where it stayed
        taken until the next claim counted the reservations anew (the next
        run created then was claimed by a tick, not handed)."""
        if reservation.owner == run_execution.reserved_for(self.owner) and reservation.claims_before == self._claims:
            self._reserved = max(0, self._reserved - 1)

    def prepare(self, created: orm.Run) -> asyncio.Future[None] | None:
        """Begin handing ``created`` before its create's statement is sent
        (PostgreSQL; on SQLite only a fold, below: _folds_on_sqlite), when
        hand() would take it now (issue 17: its
        statement, the offline model's whole answer or a provider run's
        start, built while the create's round trip leaves the loop idle);
        the future returned gates it (db.gate): hand() opens it once the
        create has committed, dropped() cancels it if the create failed,
        nothing sent. None: nothing begun, hand() decides after the commit
        as before. The hand-off counts as in flight from here (the lone-run
        rule: another run created meanwhile is claimed, not handed; a tick
        meanwhile leaves this run out of its claim), so what is built is
        thrown away only if the create fails or the run is cancelled or
        changed before the statement's compare-and-set.
        A run whose answer is not instant (a provider's model: LLM.streams)
        is started by its create instead, whatever else this worker has
        under way (the lone-run rule is for hand-offs that send a statement
        of their own): ``created`` is left in_progress,
        leased to this worker (run_state.start_in_create), for the create's
        statement to insert so and log its start after its opening events;
        the hand-off sends nothing (execute.take_started: its prompt built
        meanwhile, its execution going on once the create has committed).
        A create that failed wrote nothing; one whose outcome is unknown and
        that committed leaves the run in_progress under this worker's lease,
        executed by nobody: dropped() notes it, and each tick from the wake
        the cancelled hand-off's end sends releases it before its claim
        (until released, or its lease lapsed: the commit may land after a
        tick), for that claim to take it as any resumable run (or the
        reaper to end it, cancelled meanwhile)."""
        folds = self.runtime.llm.streams(created.model) and (
            self.runtime.run_log.postgres or self._folds_on_sqlite(created)
        )
        if folds:
            # A fold sends no statement of its own: whatever else this worker
            # has under way (other runs, hand-offs, a tick), the run is started
            # by its create, not left to a tick's claim (its statement, its
            # starts' and their commit, shared by the runs of one claim).
            if not self._foldable_now(created):
                return None
        elif not self.runtime.run_log.postgres or not self._handable_now(created) or self._tasks:
            # An instant answer's early hand-off only for a worker that
            # executes nothing (one client's runs, one after another): under
            # load the rule, checked before the create's round trip, found
            # 3-7 % of runs alone, not < 1 % as after it, each then handed by
            # a statement of its own instead of a claim's share (PostgreSQL's
            # 16 clients: 2.7-3.2 against 3.6-4.1 ms of server CPU a provider
            # run, bench/README "pgearly"). hand() decides those after the
            # commit, as before.
            return None
        committed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._gates[created.id] = committed
        self._under_way[created.id] = asyncio.get_running_loop().create_future()
        if folds:
            # Its answer is not instant (a provider's): its start is folded
            # into the create, whose one statement inserts it started,
            # leased to this worker as a claim leases it (issue 17: the
            # hand-off's statement and its WAL flush saved); the caller logs
            # the start with the create's events. The lease counts from now
            # (lease_renewer.py's margin), the run executed from the commit.
            claimed_at = time.monotonic()
            run_state.start_in_create(created, self.owner, time.time() + self.lease_seconds)
            self._calls_out[created.id] = asyncio.get_running_loop().create_future()
            # Asked now, as the statement is about to go: its first call may
            # be sent before that statement has committed if vouched for.
            vouched = run_defaults.vouch(created.assistant_id)
            self._start_hand_off(created, committed, folded_at=claimed_at, vouched=vouched)
        else:
            self._start_hand_off(created, committed)
        return committed

    def _folds_on_sqlite(self, created: orm.Run) -> bool:
        """SQLite: prepare() begins only the fold (a run whose answer is not
        instant: LLM.streams), where the worker's claim is a raw transaction
        (Runtime.claims_raw: this process the file's only writer, its run
        logs numbered without a read; a WAL reader of its own, on which the
        hand-off's prompt, if it needs a read, is read once the create has
        committed: execute.take_started). Its create is one thread hop, its
        hand-off another: the fold saves the second (its write lock and its
        commit); an instant answer's hand-off is already the run's whole
        worker side in one hop, decided after the commit (hand())."""
        return self.runtime.llm.streams(created.model) and self.runtime.claims_raw()

    def dropped(self, created: orm.Run, committed: asyncio.Future[None], *, outcome_unknown: bool = True) -> None:
        """The create prepare() began a hand-off for failed (or its outcome
        is unknown, taken for a rollback as the API takes it): the hand-off,
        gated, has sent nothing; it is cancelled, its slot freed. Not
        ``outcome_unknown`` (SQLite, a create that failed and was not
        cancelled: its hop rolled back whole, or never went), a folded run
        is not noted for release (nothing to release)."""
        committed.cancel()
        self._gates.pop(created.id, None)
        if outcome_unknown and created.status == "in_progress" and created.lease_owner == self.owner:
            # Folded (prepare()): a create whose outcome is unknown may have
            # committed the run leased to this worker, which would keep it
            # from every claim until the lease lapsed: the ticks release it.
            self._note_folded_unreleased(created)
        task = self._forget_hand_off(created.id)
        if task is not None:
            # Its end wakes the worker (_hand_off_ended): a create whose
            # outcome was unknown may have committed the run after all.
            task.cancel()

    def hand(self, created: orm.Run) -> bool:
        """Take ``created``, a run this process's API has just committed
        reserved for this worker, from its row (issue 17: execute.hand_off,
        no wake, tick or claim statement); False when it is not handed and
        the worker is to be woken as for any new run: once stopping,
        outside run_forever(), for a run that is not alone
        (another hand-off in flight, a tick under way, another run reserved
        since the last claim: those are claimed together, one claim and one
        commit for many, where a hand-off is a transaction per run; at
        sixteen clients, handing every run the worker was free for cost
        1.7 ms more server CPU per run and a third of the throughput), or a
        run whose earlier messages are not known (run_execution.handable). A hand-off that
        fails for any reason wakes the worker instead, whose tick claims the
        run, still reserved for it."""
        # Nothing here may raise: the API calls this unguarded after the
        # run's create has committed (api/runs.py), and a raise would answer
        # a created run with a 500. Attribute reads, a dict lookup and
        # create_task (the API's running loop) cannot; whatever may fail
        # belongs in _take_handed, whose failures leave the run to the tick.
        committed = self._gates.pop(created.id, None)
        if committed is not None:  # begun by prepare()
            task = self._handing.get(created.id)
            # (The gate itself is not done here: only this and dropped(),
            # which pops it first, complete it.)
            if task is None or task.done():
                # It ended before the create committed (it could not start
                # the run so, or was cancelled): the tick its end asked for
                # came too early to see the run; the caller's wake claims it.
                return False
            committed.set_result(None)  # its statement may go
            return True
        if not self._handable_now(created) and not self._handed_back_now(created):
            return False
        self._start_hand_off(created, None)
        return True

    def answer_after(self, created: orm.Run, *, streamed: bool) -> asyncio.Future[None] | None:
        """For a run hand() has just taken (prepare()): what its create
        waits for before answering (issue 17); None: nothing.

        Answered as JSON, a folded run's create waits until its first model
        call has gone out, or its hand-off has ended without one (its prompt
        not built here, the run left to its task's start()): the provider
        then answers while the create's response is written and the run's
        task starts, where the call went out only after both (0.4-0.8 ms at
        one client, run_timeline). Nothing else waits: the SDK's poll that
        follows is best held while the run's end is out (answered from the
        end's hand-off, no read), and a response written after that
        statement brought the poll after the run's end, to a read of its row
        (PostgreSQL, paired: +0.1-0.2 ms, 0.13-0.26 ms more server CPU a run).

        Streamed, any such create waits until its hand-off's statement has
        gone (PostgreSQL's instant answer, the run's whole worker side:
        db.gate's ``passed_to``) or the run's task has begun (a fold: by
        then its first call is out, and an answer read while the create was
        out, PostgreSQL's call ahead, has had its end statement sent), or
        the hand-off has ended without either: the stream's head is written
        while that statement or the model's answer is out, not ahead of it
        (bench/README)."""
        return (self._under_way if streamed else self._calls_out).get(created.id)

    def _handable_now(self, created: orm.Run) -> bool:
        return self._alone_for_this_worker(created) and run_execution.handable(created)

    def _foldable_now(self, created: orm.Run) -> bool:
        """prepare()'s conditions for a fold: looping, not stopping,
        ``created`` reserved for this worker (reservation(): a slot free for
        it) and its earlier messages known; not the lone-run rule's."""
        return (
            self._looping
            and not self._stopping
            and created.lease_owner == run_execution.reserved_for(self.owner)
            and run_execution.handable(created)
        )

    def _alone_for_this_worker(self, created: orm.Run) -> bool:
        """hand()'s conditions on the worker: looping, not stopping, no other
        hand-off or tick under way, no other run reserved since the last
        claim, and ``created`` reserved for this worker."""
        return not (
            self._stopping
            or not self._looping
            or self._handing
            or self._ticking
            or self._reserved > 1
            or created.lease_owner != run_execution.reserved_for(self.owner)
        )

    def _handed_back_now(self, created: orm.Run) -> bool:
        """A run this process's API has just queued again with its tool
        outputs, reserved for this worker, is handed back to it as a new run
        is handed (issue 17: no wake, tick or claim statement for a function
        call's answer), on SQLite (execute.hand_off reads its thread's
        earlier messages first; PostgreSQL's one-statement hand-off takes
        only a run never started: there the tick claims it)."""
        return (
            not self.runtime.run_log.postgres
            and created.started_at is not None
            and created.status == "queued"
            and self._alone_for_this_worker(created)
        )

    def _note_folded_unreleased(self, created: orm.Run) -> None:
        lease_until = created.lease_expires_at if created.lease_expires_at is not None else time.time()
        self._folded_unreleased[created.id] = lease_until

    def _start_hand_off(
        self,
        created: orm.Run,
        committed: asyncio.Future[None] | None,
        *,
        folded_at: float | None = None,
        vouched: run_defaults.Vouch | None = None,
    ) -> None:
        """``folded_at``: the run is started by its create (prepare()), its
        lease counted from then (time.monotonic()); ``vouched``: the
        assistant's defaults it was made from, as vouched for then
        (execute.take_started)."""
        taking = self._take_handed(
            created, self._claims, committed, folded_at, self._calls_out.get(created.id), vouched
        )
        task = asyncio.create_task(taking, name=f"hand-off {created.id}")
        self._handing[created.id] = task
        self._handing_since[created.id] = self._claims
        task.add_done_callback(functools.partial(self._hand_off_ended, created.id))

    def _forget_hand_off(self, run_id: str) -> asyncio.Task[None] | None:
        """The hand-off of ``run_id`` is over (its run a task, left to a
        claim, or its create failed): its task, if it was still listed."""
        self._handing_since.pop(run_id, None)
        return self._handing.pop(run_id, None)

    def _hand_off_ended(self, run_id: str, task: asyncio.Task[None]) -> None:
        if self._handing.get(run_id) is task:
            self._forget_hand_off(run_id)
        # Ended with no call sent, no statement or run's task: the create waits no longer.
        _set_done(self._calls_out.pop(run_id, None))
        _set_done(self._under_way.pop(run_id, None))
        if task.cancelled():
            # Never begun, or rolled back (its COMMIT, once under way, is
            # seen through: then the run is this worker's, its lease lapsing
            # if not finished): this worker's tick claims it, reserved for it.
            self.wake(files=False)

    async def _take_handed(
        self,
        created: orm.Run,
        claims_before: int,
        committed: asyncio.Future[None] | None,
        folded_at: float | None = None,
        call_out: asyncio.Future[None] | None = None,
        vouched: run_defaults.Vouch | None = None,
    ) -> None:
        # The create's answer first (a stream's head and opening events, or
        # the run as JSON: written in the next turns of the loop), then the
        # hand-off, whose instant answer holds the loop for a millisecond
        # or more: the tick it replaces sent its claim and waited, the
        # answer's first bytes went out meanwhile (bench/run_timeline.py).
        # Begun before the create (prepare()), it is built while the
        # create's statement is out instead, its statement held until the
        # create has committed. A folded run's (a provider's) goes before
        # the create's answer instead: the create waits until its first
        # model call is out (answer_after), the answer written while the
        # provider answers.
        if committed is not None and folded_at is not None and not self.runtime.run_log.postgres:
            # SQLite: the create's hop is sent at its COMMIT, after its append,
            # and this task would run first: a prompt built now would hold
            # the hop back (run_timeline: the create committed 1.1 ms later
            # at one client), where PostgreSQL's statement is out already.
            # Built once the create has committed (its cancellation, a
            # create that failed, ends this task), after the create's answer.
            await committed
        if committed is None or (folded_at is None and not self.runtime.run_log.postgres):
            # (A folded run's create waits for its first call instead:
            # answer_after.)
            for _ in range(_TURNS_BEFORE_HAND_OFF):
                await asyncio.sleep(0)
        claimed_at = time.monotonic() if folded_at is None else folded_at
        try:
            if folded_at is not None:  # started by its create (prepare()): no statement here
                assert committed is not None
                execution = await execute.take_started(
                    self.runtime, self.owner, created, self.builtins, committed, call_out, vouched
                )
            else:
                execution = await execute.hand_off(
                    self.runtime,
                    self.owner,
                    created,
                    self.lease_seconds,
                    self.builtins,
                    committed,
                    self._under_way.get(created.id),
                )
        except Exception as error:  # the run is claimed the usual way, reserved for this worker still
            self._forget_hand_off(created.id)  # before the wake: the claim of the tick it starts takes the run
            if not run_execution.hand_off_lost(error):
                log.warning("handing run %s to this worker failed (%s); it is claimed instead", created.id, error)
            self.wake(files=False)
            return
        if self._claims == claims_before:  # (a claim since has counted the reservations anew)
            self._reserved = max(0, self._reserved - 1)  # its slot: the run has ended, or its task below takes it
        self._forget_hand_off(created.id)
        if folded_at is not None and time.monotonic() >= self.leases.give_up_at(folded_at):
            # A create slower than the lease (stamped before its statement
            # went): the renewer would give the run up at once, or its lease
            # has lapsed and another worker may take it. Not executed under
            # it: released by the next tick, whose claim takes it afresh.
            log.warning("run %s: its create committed too late for its lease; it is claimed instead", created.id)
            execution.discard_first_call()  # (PostgreSQL's, sent while the create was out)
            self._note_folded_unreleased(created)
            self.wake(files=False)
            return
        if not execution.finished:
            if folded_at is not None:
                # Its first call goes out now (on PostgreSQL it may have
                # gone while the create was out: execute.take_started), its
                # create waiting for it (answer_after), before the run's
                # task starts.
                execution.open_first_call(call_out)
            self._start(execution, claimed_at)
        elif self._claimed_to_capacity:  # a tick meanwhile counted its slot and claimed no more: runs may wait
            self.wake(files=False)

    def _start(self, execution: execute.RunExecution, claimed_at: float) -> None:
        """A claimed run's task, its lease held from ``claimed_at`` on."""
        run_id = execution.run_id
        task = asyncio.create_task(self._execute(execution), name=f"run {run_id}")
        self._tasks[run_id] = task
        ACTIVITY.runs += 1
        task.add_done_callback(_run_ended)  # however the task ends, even cancelled before its first step
        # (a task cancelled before its first step never ran execute(), which
        # closes a first call opened early and not taken)
        task.add_done_callback(lambda _task: execution.discard_first_call())
        self.leases.hold(run_id, task, claimed_at)

    async def _handed(self) -> None:
        """Returns once no hand-off is in flight (each is one transaction)."""
        while self._handing:
            await asyncio.wait(set(self._handing.values()))

    def executes(self, run_id: str) -> bool:
        """Whether this worker's task executes ``run_id`` (claimed, not ended;
        a run answered within its claim never has one)."""
        return run_id in self._tasks

    async def wait_until_released(self, run_id: str) -> None:
        """Returns once this worker no longer executes ``run_id`` (its task
        has ended), without cancelling that execution if the wait is cancelled."""
        task = self._tasks.get(run_id)
        if task is not None:
            await asyncio.wait({task})

    def request_stop(self) -> None:
        """Stop claiming and let run_forever() drain and return (a signal
        handler calls this); asked twice, in-flight runs are not waited for."""
        if self._stopping:
            self._abandon.set()
        self._stopping = True
        self.wake()

    async def run_forever(self) -> None:
        """Claim and execute until request_stop() (or cancellation), then shut
        down: drain, release what is left, close the tools."""
        log.info("worker %s started (concurrency %d)", self.owner, self.concurrency)
        listener = None
        if not db.is_sqlite(self.runtime.settings.resolved_database_url()):
            # Runs queued by API replicas in other processes start at once,
            # not at the next poll.
            listener = asyncio.create_task(db.listen_for_work(self.runtime.engine, self.wake), name="listen")
        self._looping = True
        try:
            while not self._stopping:
                pause = self.poll_seconds if await self.guarded_tick(ingest=self._ingestion_due()) else self._backoff()
                with suppress(TimeoutError):
                    async with asyncio.timeout(pause):
                        await self._wakeup.wait()
                self._wakeup.clear()
        finally:
            self._looping = False
            if listener is not None:
                listener.cancel()
                with suppress(asyncio.CancelledError):
                    await listener
            await self.shutdown()

    def _ingestion_due(self) -> bool:
        """Whether this round claims files to ingest (see ``_files_queued``)."""
        now = time.monotonic()
        if not self._files_queued and now < self._next_ingestion:
            return False
        self._files_queued = False
        self._next_ingestion = now + self.poll_seconds
        return True

    async def guarded_tick(self, *, ingest: bool = True) -> bool:
        """One tick that never raises: False (and last_error set) if it failed."""
        try:
            await self.tick(ingest=ingest)
        except Exception as error:  # any failure must leave the loop alive
            self._failures += 1
            self.last_error = f"{type(error).__name__}: {error}"
            if self._failures == 1:  # once per streak, not once per retry
                log.exception("worker loop failed; backing off and retrying until the database answers")
            return False
        else:
            if self._failures:
                log.warning("worker loop recovered after %d failed attempts", self._failures)
            self._failures = 0
            self.last_error = None
            return True
        finally:
            self.last_loop_at = time.monotonic()

    def _backoff(self) -> float:
        return float(min(self.max_backoff_seconds, FIRST_BACKOFF_SECONDS * 2 ** (self._failures - 1)))

    async def shutdown(self, drain_seconds: float | None = None) -> None:
        """Stop claiming; give in-flight runs ``drain_seconds`` to finish;
        cancel the rest and release their leases so another worker (or the
        next start) resumes them at once instead of after the lease."""
        self._stopping = True
        # A hand-off in flight ends first: a run it started is drained below.
        await self._handed()
        drain = self.drain_seconds if drain_seconds is None else drain_seconds
        if self._tasks and drain > 0 and not self._abandon.is_set():
            log.info("worker %s draining %d runs (up to %g s)", self.owner, len(self._tasks), drain)
            # Until every run is done, the drain time is up, or a second signal.
            finished = asyncio.ensure_future(self._drained())
            abandon = asyncio.ensure_future(self._abandon.wait())
            await asyncio.wait([finished, abandon], timeout=drain, return_when=asyncio.FIRST_COMPLETED)
            finished.cancel()
            abandon.cancel()
        unfinished = list(self._tasks)
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()
        await self.leases.stop()  # (renewals went on through the drain)
        await self._release_leases(unfinished)
        await self.ingestion.stop()
        for tool in self.builtins.values():
            close = getattr(tool, "close", None)
            if close is not None:
                await close()  # e.g. the code interpreter's sandbox sessions

    async def _drained(self) -> bool:
        """Returns once every run executing now has ended (cancelling this
        wait leaves them running)."""
        await asyncio.wait(list(self._tasks.values()))
        return True

    async def stop(self) -> None:
        """Shut down at once, without draining (tests)."""
        await self.shutdown(drain_seconds=0)

    async def _release_leases_of(self, run_ids: list[str]) -> None:
        try:
            async with self.runtime.transaction() as session:
                await run_execution.release(session, self.owner, run_ids)
        except Exception:  # the database is still failing: the next good tick retries
            self._unreleased.update(run_ids)
        # The run itself is resumed by the wake _execute sends once its task
        # has left the list (a claim skips the runs this worker executes).
        self.wake()

    def _given_up(self, run_id: str) -> None:
        """The renewer stopped ``run_id``'s execution, its renewals failing:
        handed back at the next tick that reaches the database (once the
        execution has ended), rather than left until its lease lapses."""
        self._unreleased.add(run_id)

    async def _release_leases(self, unfinished: list[str]) -> None:
        try:
            async with self.runtime.transaction() as session:
                released = await run_execution.release(session, self.owner)
        except Exception:
            log.exception("could not release this worker's leases; its runs resume when the leases lapse")
            return
        if released:
            log.info("released %d runs for another worker to resume: %s", len(released), ", ".join(released))
            if not db.is_sqlite(self.runtime.settings.resolved_database_url()):
                await db.notify_work(self.runtime.engine)  # the other workers resume them now, not at their next poll
        elif unfinished:
            log.info("stopped %d runs that had already ended", len(unfinished))

    async def tick(self, *, ingest: bool = True) -> None:
        """One round: reap (at most every poll interval: it costs queries and
        only has work when something lapsed), then fill free slots; with
        ``ingest``, the free ingestion slots too."""
        self._ticking = True
        try:
            await self._tick(ingest)
        finally:
            self._ticking = False

    async def _tick(self, ingest: bool) -> None:
        if self._unreleased:  # runs stopped by a database error or given up, not handed back yet
            # A run still listed is kept for a later tick, not released: it is
            # either the failed execution that has not left the list yet (this
            # very tick may be the one its own release's wake started) or one
            # this worker claimed again since, whose lease is that execution's.
            listed = self._unreleased & self._tasks.keys()
            releasable = sorted(self._unreleased - listed)
            if releasable:
                async with self.runtime.transaction() as session:
                    await run_execution.release(session, self.owner, releasable)
            self._unreleased = listed
        if self._folded_unreleased:
            await self._release_folded()
        if time.monotonic() >= self._next_reap:
            await self.reap()
            self._next_reap = time.monotonic() + self.poll_seconds
        if time.monotonic() >= self._next_prune:
            await self.prune_run_events()
        free = self.concurrency - len(self._tasks) - len(self._handing)  # a handed run may become a task
        self._claimed_to_capacity = free <= 0
        self._reserved = 0  # this claim takes the runs reserved so far (if it has room)
        self._claims += 1
        if free > 0 and not self._stopping:
            # Claimed and started in one transaction (issue 17). The leases
            # it stamps count from before it (lease_renewer.py's margin).
            claimed_at = time.monotonic()
            claimed = await execute.claim_and_start(
                self.runtime,
                self.owner,
                free,
                self.lease_seconds,
                self.builtins,
                executing=[*self._tasks, *self._handing],
            )
            self._claimed_to_capacity = len(claimed) == free
            running = [execution for execution in claimed if not execution.finished]
            for execution in running:
                self._start(execution, claimed_at)
            if self._claimed_to_capacity and len(running) < len(claimed):
                # Runs answered at once in the claim left their slots free
                # already: more may be waiting.
                self.wake(files=False)
        # Vector store files: after runs, in their own slots (see app/retrieval/ingest.py).
        if ingest and not self._stopping:
            await self.ingestion.tick()

    async def _release_folded(self) -> None:
        """Release the runs of folded creates this worker does not execute
        (``_folded_unreleased``): a compare-and-set on this worker's lease
        (run_execution.release), so a run another worker took since its lease
        lapsed is left alone; one this worker executes or hands is skipped."""
        now = time.time()
        noted = self._folded_unreleased
        for run_id in [run_id for run_id, lease_until in noted.items() if lease_until <= now]:
            del noted[run_id]  # lapsed: any claim takes it now, the reaper ends it if cancelled
        releasable = sorted(noted.keys() - self._tasks.keys() - self._handing.keys())
        if not releasable:
            return
        async with self.runtime.transaction() as session:
            released = await run_execution.release(session, self.owner, releasable)
        for run_id in released:
            noted.pop(run_id, None)

    async def run_until_idle(self, limit_seconds: float = 30.0) -> None:
        """Execute until no run is queued or executing (tests, benchmarks)."""
        deadline = time.monotonic() + limit_seconds
        while time.monotonic() < deadline:
            await self._handed()
            await self.tick()
            if not self._tasks and not self._claimed_to_capacity:
                await self.leases.idle()  # no renewal left running behind the caller
                return  # (runs answered in their claim leave no task: claimed to capacity, more may wait)
            if self._tasks:
                await asyncio.wait(list(self._tasks.values()), return_when=asyncio.FIRST_COMPLETED)
        raise TimeoutError("runs still executing")

    async def _execute(self, execution: execute.RunExecution) -> None:
        run_id = execution.run_id
        # A streamed create answers once this step first waits (answer_after()).
        _set_done(self._under_way.pop(run_id, None))
        released = False

        def note_ended(event: Event) -> None:  # in the publisher's call, before any poll it answers goes on
            if event.name in FINAL_RUN_EVENTS:
                self._ended.add(run_id)

        try:
            with self.runtime.bus.watch(run_id, note_ended):
                await execute.run(execution)
        except DBAPIError as error:
            # The run stays in_progress; released, it is resumed from its last
            # committed step (by this worker's next claim if the database is back).
            log.warning("run %s stopped by a database error (%s); it will be resumed", run_id, error)
            await self._release_leases_of([run_id])
            released = True
        except Exception:
            # execute() ends the run itself (or leaves it to be resumed after a
            # database failure); this only guards the worker loop.
            log.exception("executing run %s", run_id)
        finally:
            task = asyncio.current_task()
            if task is not None:
                self.leases.drop(run_id, task)
            if self._tasks.get(run_id) is task:
                del self._tasks[run_id]
            self._ended.discard(run_id)
            # A slot is free for a run that may be waiting; or the run released
            # above may be resumed here: a claim made while this task was still
            # listed left it out (claim_and_start's ``executing``).
            if self._claimed_to_capacity or released:
                self.wake(files=False)

    async def claim(self, limit: int) -> list[str]:
        async with self.runtime.transaction() as session:
            executing = [*self._tasks, *self._handing]
            return await run_execution.claim(session, self.owner, limit, self.lease_seconds, executing)

    async def prune_run_events(self) -> None:
        """Delete the event logs of runs that ended longer ago than the
        retention (issue 11), a batch per tick until none is left, then
        look again after PRUNE_SECONDS."""
        older_than = time.time() - self.runtime.settings.run_events_retention_seconds
        async with self.runtime.transaction() as session:
            deleted = await run_events.prune(session, older_than)
        if deleted:
            log.info("pruned %d run events of runs ended before the retention", deleted)
        else:
            self._next_prune = time.monotonic() + PRUNE_SECONDS

    async def reap(self) -> None:
        """End runs nobody can finish: cancels whose executor is gone, runs
        whose worker died too late to resume them, and runs past expires_at
        (an executing one is stopped by its executor, which watches the row)."""
        events: dict[str, list[Event]] = {}
        async with self.runtime.transaction() as session:
            found = await run_execution.reap_candidates(session)
            for run in found.abandoned_cancels:
                if run.id not in self._tasks:
                    events[run.id] = await runs.close_out(session, run, "cancelled")
            for run in found.unresumable:
                if run.id not in self._tasks:
                    events[run.id] = await runs.close_out(session, run, "failed", last_error=INTERRUPTED)
            for run in found.overdue:
                if run.id not in events:
                    events[run.id] = await runs.close_out(session, run, "expired")
            for run_id, ending in events.items():
                log.debug("run %s ended by the reaper: %s", run_id, ending[-1].name)
                await self.runtime.run_log.append(session, run_id, ending)
