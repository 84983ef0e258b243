"""One lease renewer per worker: every period, ONE statement renews the
leases of all the runs the worker is executing.

A claim stamps a run's first lease (services/run_execution.py); the lease
must be renewed before it lapses, or another worker may claim the run. A
renewer task per run (the previous design) cost every run a task, a sleep
and a cancellation, though most runs end in milliseconds, long before their
first renewal is due (issue 17). Here an executing run is an entry in a
dict; a timer (a loop callback, no task) is armed while runs are held, and
when it fires one task renews them all, then arms the next period.

What an execution is told is unchanged: when its lease is lost (renewals
failed until it was about to lapse, or another worker claimed the run), its
task is cancelled, so two workers never execute a run at once. A run whose
lease was cleared (it left the executor's hands, or was released) is not
lost, and the compare-and-set on the owner never gives it a lease back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from app.runtime import Runtime
from app.services import run_execution

log = logging.getLogger("app.worker")

# Give a run up this far into its lease without a successful renewal: before
# it can lapse under us (another worker may claim it then).
GIVE_UP_FRACTION = 0.9


@dataclass
class _HeldLease:
    execution: asyncio.Task[None]  # cancelled if the lease is lost
    renewed_at: float  # monotonic: the claim, then each successful renewal


class LeaseRenewer:
    def __init__(self, runtime: Runtime, owner: str, lease_seconds: float) -> None:
        self.runtime = runtime
        self.owner = owner
        self.lease_seconds = lease_seconds
        # Three renewals per lease: two may fail before it lapses.
        self.period = lease_seconds / 3
        self._held: dict[str, _HeldLease] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._round: asyncio.Task[None] | None = None
        self._stopped = False
        self.rounds = 0  # renewal rounds started (tests, benchmarks)

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    def hold(self, run_id: str, execution: asyncio.Task[None]) -> None:
        """Renew ``run_id``'s lease (just stamped by its claim) while
        ``execution`` runs; its first renewal comes within one period."""
        self._held[run_id] = _HeldLease(execution, time.monotonic())
        self._arm()

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

    def _arm(self) -> None:
        # A round in flight arms the next period itself when it ends.
        if self._timer is None and self._round is None and not self._stopped:
            self._timer = asyncio.get_running_loop().call_later(self.period, self._start_round)

    def _start_round(self) -> None:
        self._timer = None
        if not self._held or self._stopped:
            return  # the next hold() arms the timer again
        self.rounds += 1
        self._round = asyncio.create_task(self._renew_all(), name="lease renewal")
        self._round.add_done_callback(self._round_ended)

    def _round_ended(self, _round: asyncio.Task[None]) -> None:
        self._round = None
        if self._held:
            self._arm()

    async def _renew_all(self) -> None:
        held = dict(self._held)  # runs held from now on wait for the next round
        run_ids = sorted(held)
        started_at = time.monotonic()
        try:
            async with self.runtime.transaction() as session:
                renewed = await run_execution.renew(session, self.owner, run_ids, self.lease_seconds)
                # The rows the UPDATE did not return: ended, released, or claimed by another worker.
                missed = sorted(set(run_ids) - set(renewed))
                lost = await run_execution.taken_over(session, self.owner, missed)
        except Exception as error:  # retried at the next period
            for run_id in run_ids:
                log.warning("renewing the lease of run %s failed (%s); retrying", run_id, error)
            now = time.monotonic()
            lost = [
                run_id
                for run_id, lease in held.items()
                if now - lease.renewed_at > self.lease_seconds * GIVE_UP_FRACTION
            ]
        else:
            for run_id in renewed:
                held[run_id].renewed_at = started_at  # the lease runs from (after) the statement
        for run_id in lost:
            lease = held[run_id]
            if self._held.get(run_id) is not lease:
                continue  # its execution ended meanwhile
            log.warning("lost the lease of run %s; stopping its execution here", run_id)
            del self._held[run_id]
            lease.execution.cancel()
