"""What this process is doing at this moment: HTTP requests being answered
and runs its worker is executing, as two counters.

Read where a choice depends on whether the process serves one thing or
many: a lone SQLite commit goes on the event loop's thread, which is
otherwise idle while it waits for aiosqlite's (sqlite_driver; issue 17),
and on aiosqlite's thread when other work could use the loop meanwhile.
Plain integers on the event loop's thread: a count is wrong only by what a
task in between changed, and a wrong reading costs a few microseconds, not
correctness."""

from __future__ import annotations


class Activity:
    __slots__ = ("requests", "runs")

    def __init__(self) -> None:
        self.requests = 0  # from the request's start to its response's last byte (streams included)
        self.runs = 0  # runs the worker executes in a task of their own

    def lone(self) -> bool:
        """At most one request (a run's create, or its stream, or a poll
        held until it ends) and one run: a single client's run, and nothing
        else the loop could serve meanwhile."""
        return self.requests <= 1 and self.runs <= 1


ACTIVITY = Activity()
