"""Stopping a task of our own: cancel it, wait for it to end."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has ended; its own failure, if it
    ended by one, is raised here. A cancel of the caller meanwhile is the
    caller's and goes on up (``suppress(CancelledError)`` around ``await
    task`` would swallow it with the task's own, and a close() cancelled by
    its caller would run on to its end as if it were not)."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.result()
