"""What the run engine's tests share: polling with a deadline, a runtime
with a short lease, a worker running in the test's loop, and a recorder of
the statements sent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import pytest
from sqlalchemy import event

from app.runtime import Runtime
from app.settings import Settings
from app.worker import Worker
from tests.streaming import rules

DEADLINE = 30.0
T = TypeVar("T")


async def until(condition: Callable[[], Any], what: str, deadline: float = DEADLINE) -> None:
    """Poll ``condition`` (sync or async) until true, or fail naming ``what``."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


@asynccontextmanager
async def runtime_with_lease(settings: Settings, lease_seconds: float) -> AsyncIterator[Runtime]:
    """A started runtime whose worker polls briskly and leases runs for
    ``lease_seconds``; closed after."""
    update = {"worker_poll_seconds": 0.05, "run_lease_seconds": lease_seconds}
    runtime = await Runtime.start(settings.model_copy(update=update))
    try:
        yield runtime
    finally:
        await runtime.close()


async def running_worker(runtime: Runtime, **kwargs: Any) -> tuple[Worker, asyncio.Task[None]]:
    """A worker of ``runtime`` running in a task (woken by the runs made)."""
    worker = Worker(runtime, **kwargs)
    runtime.wake_worker = worker.wake
    return worker, asyncio.create_task(worker.run_forever())


async def stop_worker(worker: Worker, task: asyncio.Task[None]) -> None:
    worker.request_stop()
    worker.request_stop()  # no drain: whatever is left is released
    await task


@contextmanager
def statements_sent(runtime: Runtime, keep: Callable[[str, Any], T | None]) -> Iterator[list[T]]:
    """What ``keep(statement, parameters)`` makes of each statement
    ``runtime``'s engine sends while inside (those it makes None of left out)."""
    seen: list[T] = []

    def before(_connection: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        kept = keep(statement, parameters)
        if kept is not None:
            seen.append(kept)

    engine = runtime.engine.sync_engine
    event.listen(engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", before)


async def streamed_to_end(response: Any) -> list[str]:
    """A streamed run's response (api/sse.RunStream) sent as the server
    sends it, to a client that stays: the names of its events, in order, to
    the stream's end (within the deadline), its frames checked as the
    streaming tests check them (tests/streaming/rules.read)."""
    body: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            body.append(message.get("body", b""))

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client never leaves
        raise AssertionError("unreachable")

    await asyncio.wait_for(response({"type": "http", "method": "POST"}, receive, send), DEADLINE)
    events, _keepalives = rules.read(body)
    return [event.event for event in events]
