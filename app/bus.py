"""EventBus: fan-out of run events to whoever is listening (SSE streams, tests).

In-process for now: the executor and the HTTP server share one process when
the worker runs inside `serve`. Topics are run ids. Publishing never blocks
and never fails the publisher; a subscriber that stops reading only loses
its own events.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from app.wire.events import Event

log = logging.getLogger("app.bus")

# Sees every published batch (run id, events): metrics and the failed-run log
# (app/observability/runs.py). Must be quick and never block.
Tap = Callable[[str, list[Event]], None]


class EventBus:
    def __init__(self) -> None:
        self._subscribers: defaultdict[str, set[asyncio.Queue[Event]]] = defaultdict(set)
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
