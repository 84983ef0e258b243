"""Following one run's event log from a sequence number on (issue 11): what
every stream reads, whichever process executes the run.

Entries handed over by this process's RunLog (app/run_log.py) are used as
they come when they continue the sequence; anything else (a nudge from a
PostgreSQL NOTIFY, a gap, a quiet spell) is answered by reading the log.
Reads are short transactions; none is held while waiting. Streams read
through Runtime.reading (on SQLite a WAL reader beside the writers: a
stream's read neither takes nor waits for the process's write lock).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from app.bus import Entry, EventBus, FollowerQueue
from app.services import run_events

log = logging.getLogger("app.run_follow")

Transaction = Callable[[], AbstractAsyncContextManager[AsyncSession]]

# A follower that is handed nothing reads the log anyway, at intervals that
# double from the first to the second while it finds nothing: a safety net
# for a lost NOTIFY, and how a SQLite process sees runs another process
# executes. A read that finds entries starts the intervals over.
POLL_MIN_SECONDS = 0.05
POLL_MAX_SECONDS = 2.0
READ_LIMIT = 1000
# While the log's news is announced in this process (``announced``: every
# append is handed over or nudged about), reading it is only a safety net:
# at this interval. Under 16 streaming clients a run waits for a worker slot
# longer than POLL_MIN_SECONDS, and each stream read the log once or twice
# for nothing, a transaction each (issue 17).
ANNOUNCED_POLL_SECONDS = POLL_MAX_SECONDS


class Interrupted(Exception):
    """interrupt() was called (the server is shutting down)."""


class Follower:
    def __init__(
        self,
        bus: EventBus,
        transaction: Transaction,
        run_id: str,
        after: int,
        *,
        read_first: bool = True,
        announced: Callable[[], bool] = lambda: False,
    ) -> None:
        self.bus = bus
        self.transaction = transaction
        # Whether every entry of the log reaches this follower through the
        # bus (handed over, or a nudge to read): asked at each wait, since it
        # can change (Runtime.log_news_announced).
        self.announced = announced
        self.run_id = run_id
        self.last = after  # the last seq handed out
        self._held: dict[int, Entry] = {}  # handed over by the bus, not yet in sequence
        self._queue: FollowerQueue | None = None
        self._stack = AsyncExitStack()
        self._poll = POLL_MIN_SECONDS
        self._interrupted = False
        # Read the log at the first call, unless subscribed before anything
        # after ``after`` could be logged (a stream opened by its own request).
        self._stale = read_first

    async def open(self) -> None:
        """Subscribe to this process's deliveries; before reading the log or
        before the transaction that starts the run commits, so that nothing
        falls between the two."""
        self._queue = await self._stack.enter_async_context(self.bus.follow(self.run_id))

    async def close(self) -> None:
        await self._stack.aclose()

    def interrupt(self) -> None:
        self._interrupted = True
        if self._queue is not None:
            self._queue.put_nowait(None)

    async def next_batch(self, idle: float) -> list[Entry]:
        """The entries after the last one handed out, in order (at least one),
        or [] once ``idle`` seconds pass without any."""
        assert self._queue is not None, "open() first"
        deadline = time.monotonic() + idle
        must_read, self._stale = self._stale, False
        while True:
            if self._interrupted:
                raise Interrupted
            if must_read:
                await self._read()
            batch = self._in_sequence()
            if batch:
                return batch
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            interval = ANNOUNCED_POLL_SECONDS if self.announced() else self._poll
            must_read = await self._wait(min(remaining, interval))

    async def _wait(self, seconds: float) -> bool:
        """Take what the bus hands over; True if the log must be read."""
        assert self._queue is not None
        try:
            async with asyncio.timeout(seconds):
                item = await self._queue.get()
        except TimeoutError:
            self._poll = min(self._poll * 2, POLL_MAX_SECONDS)
            return True
        items = [item]
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        nudged = False
        for delivered in items:
            if delivered is None:
                nudged = True
                continue
            for entry in delivered:
                if entry.seq > self.last:
                    self._held[entry.seq] = entry
        return nudged or (bool(self._held) and self.last + 1 not in self._held)

    async def _read(self) -> None:
        try:
            async with self.transaction() as session:
                found = await run_events.read(session, self.run_id, self.last, READ_LIMIT)
        except DBAPIError as error:
            # The database is failing (too many connections, a restart): the
            # stream waits and reads again at the next poll; the run goes on.
            log.warning("reading the events of run %s failed (%s); retrying", self.run_id, error)
            self._poll = POLL_MAX_SECONDS
            return
        for entry in found:
            self._held[entry.seq] = entry
        if found:
            self._poll = POLL_MIN_SECONDS

    def _in_sequence(self) -> list[Entry]:
        batch = []
        while self.last + 1 in self._held:
            self.last += 1
            batch.append(self._held.pop(self.last))
        for seq in [seq for seq in self._held if seq <= self.last]:
            del self._held[seq]
        return batch
