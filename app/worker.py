"""The worker: claims queued runs and executes them; reaps runs whose worker
died and runs that expired.

The row is the job. A claim is a compare-and-set UPDATE that stamps a lease
(on PostgreSQL the candidate rows are locked with FOR UPDATE SKIP LOCKED, so
concurrent workers never pick the same run); the executor renews the lease
while it works. A run whose lease lapsed while in_progress belonged to a
worker that crashed or was killed: it is failed with a clear last_error,
and what it had completed (messages, steps) stays.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from contextlib import suppress

from sqlalchemy import or_, select, update

from app import db, ids, orm
from app.retrieval import ingest
from app.runner import execute
from app.runner.tools import registry
from app.runtime import Runtime
from app.services import runs
from app.wire.events import Event

log = logging.getLogger("app.worker")

INTERRUPTED = {
    "code": "server_error",
    "message": "The run was interrupted because the worker executing it stopped (crash or restart). "
    "Create a new run to continue.",
}


class Worker:
    def __init__(self, runtime: Runtime, *, concurrency: int | None = None) -> None:
        self.runtime = runtime
        settings = runtime.settings
        self.concurrency = concurrency or settings.worker_concurrency
        self.lease_seconds = settings.run_lease_seconds
        self.poll_seconds = settings.worker_poll_seconds
        self.owner = f"{socket.gethostname()[:32]}:{os.getpid()}:{secrets.token_hex(4)}"
        self._wakeup = asyncio.Event()
        self._next_reap = 0.0
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.builtins = registry.builtin_tools(runtime)
        self.ingestion = ingest.Ingestion(runtime, self.owner, self.wake)

    def wake(self) -> None:
        self._wakeup.set()

    @property
    def busy(self) -> int:
        return len(self._tasks)

    async def run_forever(self) -> None:
        log.info("worker %s started (concurrency %d)", self.owner, self.concurrency)
        listener = None
        if not db.is_sqlite(self.runtime.settings.resolved_database_url()):
            # Runs queued by API replicas in other processes start at once,
            # not at the next poll.
            listener = asyncio.create_task(db.listen_for_work(self.runtime.engine, self.wake), name="listen")
        try:
            while True:
                await self.tick()
                with suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_seconds):
                        await self._wakeup.wait()
                self._wakeup.clear()
        finally:
            if listener is not None:
                listener.cancel()
                with suppress(asyncio.CancelledError):
                    await listener
            await self.stop()

    async def stop(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()
        await self.ingestion.stop()
        for tool in self.builtins.values():
            close = getattr(tool, "close", None)
            if close is not None:
                await close()  # e.g. the code interpreter's sandbox sessions

    async def tick(self) -> None:
        """One round: reap (at most every poll interval: it costs queries and
        only has work when something lapsed), then fill free slots."""
        if time.monotonic() >= self._next_reap:
            self._next_reap = time.monotonic() + self.poll_seconds
            await self.reap()
        free = self.concurrency - len(self._tasks)
        if free > 0:
            for run_id in await self.claim(free):
                self._tasks[run_id] = asyncio.create_task(self._execute(run_id), name=f"run {run_id}")
        # Vector store files: after runs, in their own slots (see app/retrieval/ingest.py).
        await self.ingestion.tick()

    async def run_until_idle(self, limit_seconds: float = 30.0) -> None:
        """Execute until no run is queued or executing (tests, benchmarks)."""
        deadline = time.monotonic() + limit_seconds
        while time.monotonic() < deadline:
            await self.tick()
            if not self._tasks:
                return
            await asyncio.wait(list(self._tasks.values()), return_when=asyncio.FIRST_COMPLETED)
        raise TimeoutError("runs still executing")

    async def _execute(self, run_id: str) -> None:
        renewer = asyncio.create_task(self._renew_lease(run_id))
        try:
            await execute.execute(self.runtime, run_id, self.builtins)
        except Exception:
            # execute() ends the run itself; this only guards the worker loop.
            log.exception("executing run %s", run_id)
        finally:
            renewer.cancel()
            with suppress(asyncio.CancelledError):
                await renewer
            self._tasks.pop(run_id, None)
            self.wake()  # a slot is free

    async def claim(self, limit: int) -> list[str]:
        now = time.time()
        candidates = (
            select(orm.Run.id)
            .where(orm.Run.status == "queued")
            .where(or_(orm.Run.lease_expires_at.is_(None), orm.Run.lease_expires_at < now))
            .order_by(orm.Run.seq)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        claim = (
            update(orm.Run)
            .where(orm.Run.id.in_(candidates.scalar_subquery()), orm.Run.status == "queued")
            .where(or_(orm.Run.lease_expires_at.is_(None), orm.Run.lease_expires_at < now))
            .values(lease_owner=self.owner, lease_expires_at=now + self.lease_seconds)
            .returning(orm.Run.id)
            .execution_options(synchronize_session=False)
        )
        async with self.runtime.transaction() as session:
            return list((await session.scalars(claim)).all())

    async def _renew_lease(self, run_id: str) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            async with self.runtime.transaction() as session:
                await session.execute(
                    update(orm.Run)
                    .where(orm.Run.id == run_id, orm.Run.lease_owner == self.owner)
                    .values(lease_expires_at=time.time() + self.lease_seconds)
                    .execution_options(synchronize_session=False)
                )

    async def reap(self) -> None:
        """Fail runs whose executor died; expire runs past expires_at."""
        now = time.time()
        lapsed = select(orm.Run).where(
            orm.Run.status.in_(("in_progress", "cancelling")),
            orm.Run.lease_expires_at < now,
        )
        overdue = select(orm.Run).where(
            orm.Run.status.in_(("queued", "requires_action")),
            orm.Run.expires_at <= ids.now(),
        )
        events: dict[str, list[Event]] = {}
        async with self.runtime.transaction() as session:
            for run in (await session.scalars(lapsed.with_for_update(skip_locked=True))).all():
                if run.id in self._tasks:
                    continue  # ours and alive; the renewal is just late
                to = "cancelled" if run.status == "cancelling" else "failed"
                events[run.id] = await runs.close_out(
                    session, run, to, last_error=INTERRUPTED if to == "failed" else None
                )
            for run in (await session.scalars(overdue.with_for_update(skip_locked=True))).all():
                if run.status == "queued" and run.lease_expires_at is not None and run.lease_expires_at > now:
                    continue  # just claimed: its executor will start it
                events[run.id] = await runs.close_out(session, run, "expired")
        for run_id, run_events in events.items():
            log.warning("run %s ended by the reaper: %s", run_id, run_events[-1].name)
            self.runtime.bus.publish(run_id, run_events)
