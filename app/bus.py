"""EventBus: in-process fan-out of run events. Topics are run ids.

Two kinds of subscribers:

- ``subscribe()``: the events as they happen in this process, ``watch()``:
  the same handed to a callback, no task of its own to wake for each (the
  executor's cancel watch, a held poll waiting for its run's stopping
  event), and ``taps`` that see every batch (metrics and the failed-run log,
  app/observability). Each event reaches them once, in the process that
  made it.
- ``follow()``: the run's *logged* events with their sequence numbers
  (app/run_log.py), for streams. Besides entries a follower's queue gets
  ``None``, a nudge that says "the log has news you were not handed" (a
  PostgreSQL NOTIFY from another process, or a shutdown): it reads the log.

Publishing never blocks and never fails the publisher; a subscriber that
stops reading only loses its own events.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from app.wire.events import Event

log = logging.getLogger("app.bus")

# Sees every published batch (run id, events): metrics and the failed-run log
# (app/observability/runs.py). Must be quick and never block.
Tap = Callable[[str, list[Event]], None]


@dataclass(frozen=True)
class Entry:
    """One logged event of a run: its sequence number in the run's log (from
    1, the SSE ``id:``) and the event."""

    seq: int
    event: Event


# What a follower's queue carries: logged entries, or None for "read the log".
FollowerQueue = asyncio.Queue[Sequence[Entry] | None]


class EventBus:
    def __init__(self) -> None:
        self._subscribers: defaultdict[str, set[asyncio.Queue[Event]]] = defaultdict(set)
        self._followers: defaultdict[str, set[FollowerQueue]] = defaultdict(set)
        self._watchers: defaultdict[str, set[Callable[[Event], None]]] = defaultdict(set)
        self.taps: list[Tap] = []

    def publish(self, topic: str, events: list[Event]) -> None:
        for tap in self.taps:
            try:
                tap(topic, events)
            except Exception:  # observing must never fail the publisher
                log.exception("an event tap failed")
        for queue in list(self._subscribers.get(topic, ())):
            for event in events:
                queue.put_nowait(event)
        for watcher in list(self._watchers.get(topic, ())):
            for event in events:
                try:
                    watcher(event)
                except Exception:  # as a tap: never the publisher's failure
                    log.exception("an event watcher failed")

    def deliver(self, topic: str, entries: Sequence[Entry]) -> None:
        """Hand logged entries to the run's followers in this process."""
        if entries:
            for queue in list(self._followers.get(topic, ())):
                queue.put_nowait(entries)

    def nudge(self, topic: str) -> None:
        """Tell the run's followers that its log has entries they were not handed."""
        for queue in list(self._followers.get(topic, ())):
            queue.put_nowait(None)

    def nudge_all(self) -> None:
        for topic in list(self._followers):
            self.nudge(topic)

    def following(self, topic: str) -> bool:
        return bool(self._followers.get(topic))

    def watched(self, topic: str) -> bool:
        return bool(self._watchers.get(topic))

    def subscribed(self, topic: str) -> bool:
        return bool(self._subscribers.get(topic))

    @asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[asyncio.Queue[Event]]:
        """Subscribe before triggering the work whose events you want."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers[topic].add(queue)
        try:
            yield queue
        finally:
            self._subscribers[topic].discard(queue)
            if not self._subscribers[topic]:
                del self._subscribers[topic]

    @contextmanager
    def watch(self, topic: str, callback: Callable[[Event], None]) -> Iterator[None]:
        """Within: ``callback`` gets each event published on ``topic``, as it is
        published (quick, never blocking: it runs in the publisher's call)."""
        self._watchers[topic].add(callback)
        try:
            yield
        finally:
            self._watchers[topic].discard(callback)
            if not self._watchers[topic]:
                del self._watchers[topic]

    @asynccontextmanager
    async def follow(self, topic: str) -> AsyncIterator[FollowerQueue]:
        queue: FollowerQueue = asyncio.Queue()
        self._followers[topic].add(queue)
        try:
            yield queue
        finally:
            self._followers[topic].discard(queue)
            if not self._followers[topic]:
                del self._followers[topic]
