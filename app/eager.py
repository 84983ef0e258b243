"""A coroutine started at once, in its caller's turn of the event loop, and
carried on by a task from its first wait: what Python 3.12's eager tasks
(``asyncio.eager_task_factory``) do, for the 3.11 the server runs on.

Why (issue 17): a unit of work whose outcome must be seen through a
cancellation of its caller runs in a task of its own (db.watched: a run's
end statement, a hand-off's, a flush of the run log). A task's first step
waits for the loop's next turn, behind whatever the loop queued meanwhile:
an SDK poll that arrived while a run's turn was being built had its request
handled (0.1-0.2 ms) before the run's end statement went. Started here, the
work sends its statement in its caller's turn (PostgreSQL, polled direct
route: -0.11 ms a run, paired; bench/README).

While its first step runs, ``asyncio.current_task()`` is the caller's task
(as in 3.12's eager tasks): work started so must not hand its current task
to anything that cancels it later.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextvars
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


def start(work: Coroutine[Any, Any, T], context: contextvars.Context) -> asyncio.Future[T]:
    """``work`` run now, in ``context``, up to its first wait; then carried
    on by a task in the same context, returned. A work that ends in that
    first step is answered by a future already done: its result, its
    exception, or cancelled (it raised CancelledError, as a task whose
    coroutine does is)."""
    loop = asyncio.get_running_loop()
    try:
        waited_on = context.run(work.send, None)
    except StopIteration as stop:
        done: asyncio.Future[T] = loop.create_future()
        done.set_result(stop.value)
        return done
    except asyncio.CancelledError:
        cancelled: asyncio.Future[T] = loop.create_future()
        cancelled.cancel()
        return cancelled
    except Exception as error:
        failed: asyncio.Future[T] = loop.create_future()
        failed.set_exception(error)
        return failed
    return loop.create_task(_CarriedOn(work, waited_on), context=context)


class _CarriedOn(collections.abc.Coroutine):  # type: ignore[type-arg]
    """The rest of a work begun by start(), for a task to drive: its first
    step hands the task what the work waits on; each later send or throw
    (a wake-up, the task's cancellation) is passed on to the work. (Not a
    generator: a task cancelled before its first step throws into its
    coroutine at once, and a generator not yet started would raise that at
    its first line, the work never told.)"""

    def __init__(self, work: Coroutine[Any, Any, Any], waited_on: Any) -> None:
        self._work = work
        self._waited_on = waited_on
        self._handed = False

    def send(self, value: Any) -> Any:
        if not self._handed:
            self._handed = True
            return self._waited_on
        return self._work.send(value)

    def throw(self, error: Any, value: Any = None, traceback: Any = None) -> Any:
        if not self._handed:
            # Cancelled before its first step: what the work waits on is
            # cancelled, as a task waiting on it would cancel it.
            self._handed = True
            if isinstance(self._waited_on, asyncio.Future):
                self._waited_on.cancel()
        if value is None and traceback is None:
            return self._work.throw(error)
        return self._work.throw(error, value, traceback)

    def close(self) -> None:
        self._work.close()

    def __await__(self) -> Generator[Any, Any, Any]:
        raise TypeError("driven by its task, not awaited")
