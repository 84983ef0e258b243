"""One lease renewer per worker: every period, ONE statement renews the
leases of all the runs the worker is executing.

A claim stamps a run's first lease (services/run_execution.py); the lease
must be renewed before it lapses, or another worker may claim the run. A
renewer task per run (the previous design) cost every run a task, a sleep
and a cancellation, though most runs end in milliseconds, long before their
first renewal is due (issue 17). Here an executing run is an entry in a
dict; a timer (a loop callback, no task) is armed while runs are held, and
when it fires one task renews them all, then arms the next round.

What an execution is told is unchanged: when its lease is lost (renewals
failed until it was about to lapse, or another worker claimed the run), its
task is cancelled, so two workers never execute a run at once (a write that
gets through anyway is refused by the owner check: ``execute.LeaseLost``).
A run whose lease was cleared (it left the executor's hands, or was
released) is not lost, and the compare-and-set on the owner never gives it
a lease back.

The margin: the database's lease runs ``lease_seconds`` from a moment taken
before its statement (the claim's, or a renewal's) was sent, and this
renewer counts from a moment taken earlier still, kept only once that
statement's transaction committed. Each attempt's statements are cut off
well within the lease (ATTEMPT_FRACTION: a database that does not answer),
its wait for this process's own queue (SQLite's write lock, a connection of
the pool: other transactions here at work) only at the give-up moment; a
run is given up at GIVE_UP_FRACTION of its lease since then, by a round
scheduled for that moment, not at the lapse: so this worker stops
streaming a run before another worker may legitimately take it over and
ask the model again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.runtime import Runtime
from app.services import run_execution

log = logging.getLogger("app.worker")

# Give a run up this far into its lease without a successful renewal: before
# it can lapse under us (another worker may claim it then).
GIVE_UP_FRACTION = 0.9
# One renewal attempt's statements are cut off after this share of the
# lease (5 s of the default 30): the rounds of a lease (every third of it)
# each get a bounded try, and the give-up round still comes before the lapse.
ATTEMPT_FRACTION = 1 / 6
# A loop timer may fire a little before its time (uvloop counts whole
# milliseconds): a round due at a give-up moment gives up what is due this
# close to it, rather than start an attempt with no time left.
TIMER_SLACK_SECONDS = 0.01


@dataclass
class _HeldLease:
    execution: asyncio.Task[None]  # cancelled if the lease is lost
    # time.monotonic() before the statement that last stamped the lease (the
    # claim, then each renewal that committed): the lease in the database
    # runs at least lease_seconds from here.
    renewed_at: float


class LeaseRenewer:
    def __init__(
        self, runtime: Runtime, owner: str, lease_seconds: float, on_given_up: Callable[[str], None] | None = None
    ) -> None:
        self.runtime = runtime
        # Told each run whose execution was stopped because its renewals
        # failed (not one taken over): its lease is still this owner's.
        self.on_given_up = on_given_up
        self.owner = owner
        self.lease_seconds = lease_seconds
        # Three renewals per lease: two may fail before it lapses.
        self.period = lease_seconds / 3
        self.attempt_seconds = lease_seconds * ATTEMPT_FRACTION
        self._held: dict[str, _HeldLease] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when the armed timer fires (time.monotonic())
        self._round: asyncio.Task[None] | None = None
        self._stopped = False
        self.rounds = 0  # renewal rounds started (tests, benchmarks)

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    def renewed_at(self, run_id: str) -> float | None:
        """When ``run_id``'s lease counts from (time.monotonic()), if held."""
        held = self._held.get(run_id)
        return None if held is None else held.renewed_at

    def hold(self, run_id: str, execution: asyncio.Task[None], stamped_at: float) -> None:
        """Renew ``run_id``'s lease while ``execution`` runs; ``stamped_at``
        is time.monotonic() taken before the claim that stamped the lease was
        sent. Its first renewal comes within one period."""
        lease = _HeldLease(execution, stamped_at)
        self._held[run_id] = lease
        self._arm(self._next_round_at(self._give_up_at(lease)))

    def drop(self, run_id: str, execution: asyncio.Task[None]) -> None:
        """``execution`` ended: no renewal for its run from now on. (The timer
        stays armed; it starts no round if nothing is held when it fires,
        which is cheaper than disarming it after every short run.)"""
        held = self._held.get(run_id)
        if held is not None and held.execution is execution:
            del self._held[run_id]

    async def stop(self) -> None:
        """No more renewals (shutdown: the executions were stopped first)."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._round is not None:
            self._round.cancel()
        await self.idle()
        self._held.clear()

    async def idle(self) -> None:
        """Returns once no renewal round is in flight."""
        if self._round is not None:
            await asyncio.wait({self._round})

    def _give_up_at(self, lease: _HeldLease) -> float:
        return self.give_up_at(lease.renewed_at)

    def give_up_at(self, stamped_at: float) -> float:
        """When a lease stamped at ``stamped_at`` (time.monotonic(), taken
        before its statement went) is given up, unrenewed: a run not yet
        held whose moment has passed is not to be executed under that lease."""
        return stamped_at + self.lease_seconds * GIVE_UP_FRACTION

    def _next_round_at(self, give_up_at: float) -> float:
        """The next period, or sooner when the earliest give-up moment of the
        runs held is near (their renewals failing, or a claim that took
        long): a last attempt that can end before it, then that moment
        itself, when the round stops them before their leases can lapse."""
        now = time.monotonic()
        last_attempt_at = give_up_at - self.attempt_seconds
        return min(now + self.period, last_attempt_at if last_attempt_at > now else give_up_at)

    def _arm(self, at: float) -> None:
        """A round at ``at`` (time.monotonic()), or sooner if one is armed
        for sooner. A round in flight arms the next one itself when it ends."""
        if self._round is not None or self._stopped:
            return
        if self._timer is not None:
            if self._timer_at <= at:
                return
            self._timer.cancel()
        self._timer_at = at
        self._timer = asyncio.get_running_loop().call_later(max(0.0, at - time.monotonic()), self._start_round)

    def _start_round(self) -> None:
        self._timer = None
        if not self._held or self._stopped:
            return  # the next hold() arms the timer again
        self.rounds += 1
        self._round = asyncio.create_task(self._renew_all(), name="lease renewal")
        self._round.add_done_callback(self._round_ended)

    def _round_ended(self, round_: asyncio.Task[None]) -> None:
        self._round = None
        if not round_.cancelled() and (error := round_.exception()) is not None:
            # (_renew_all catches the database's failures: this is a bug; the
            # next round still comes, the give-up check with it.)
            log.error("a lease renewal round failed", exc_info=error)
        if self._held:
            self._arm(self._next_round_at(min(self._give_up_at(lease) for lease in self._held.values())))

    async def _renew_all(self) -> None:
        self._give_up(time.monotonic() + TIMER_SLACK_SECONDS)  # too late for any attempt to save them
        held = dict(self._held)  # runs held from now on wait for the next round
        if not held:
            return
        run_ids = sorted(held)
        give_up_at = min(self._give_up_at(lease) for lease in held.values())
        # On SQLite, the connection is this process's own write lock, queued
        # for up to the give-up moment: a wait there is other transactions of
        # this process at work, not a database gone silent, and cutting it at
        # the attempt's limit gave runs up (their model asked again
        # elsewhere) while the queue stayed slower than that. On PostgreSQL
        # the checkout may open a connection or ping an idle one (a server
        # gone silent): bounded by the attempt's limit like the statements.
        local_queue = not self.runtime.run_log.postgres
        limit = give_up_at - time.monotonic()
        if not local_queue:
            limit = min(self.attempt_seconds, limit)
        try:
            async with asyncio.timeout(limit) as deadline, self.runtime.transaction() as session:
                await session.connection()
                # Taken before the statement; kept once its transaction committed.
                started_at = time.monotonic()
                if local_queue:
                    # The statements: bounded, and over before the first of these runs is given up.
                    limit = min(self.attempt_seconds, give_up_at - started_at)
                    deadline.reschedule(asyncio.get_running_loop().time() + limit)
                renewed = await run_execution.renew(session, self.owner, run_ids, self.lease_seconds)
                # The rows the UPDATE did not return: ended, released, or claimed by another worker.
                missed = sorted(set(run_ids) - set(renewed))
                lost = await run_execution.taken_over(session, self.owner, missed)
        except Exception as error:  # a dropped connection, a lock, the time limit: retried next round
            why = f"no answer within {limit:.3g} s" if isinstance(error, TimeoutError) else str(error)
            for run_id in run_ids:
                log.warning("renewing the lease of run %s failed (%s); retrying", run_id, why)
            self._give_up(time.monotonic())
            return
        for run_id in renewed:
            held[run_id].renewed_at = started_at
        for run_id in lost:
            self._stop_execution(run_id, held[run_id])

    def _give_up(self, now: float) -> None:
        """Stop the executions whose leases were not renewed in time."""
        for run_id, lease in list(self._held.items()):
            if self._give_up_at(lease) <= now:
                self._stop_execution(run_id, lease)
                if self.on_given_up is not None:
                    self.on_given_up(run_id)

    def _stop_execution(self, run_id: str, lease: _HeldLease) -> None:
        if self._held.get(run_id) is not lease:
            return  # its execution ended meanwhile
        log.warning("lost the lease of run %s; stopping its execution here", run_id)
        del self._held[run_id]
        lease.execution.cancel()
