"""Whether this process is the only server process using its SQLite database
(issue 17), which early delivery needs (app/run_log.py).

On SQLite a process hands the deltas it publishes to its own streams at once,
numbered by its own counter, before writing them. That is right only while
no other process appends to the same file: another process's append (a
cancel, tool outputs, the reaper) would take a number already handed out, and
a stream here would repeat a delta and miss that event. So every server
process using the file (``serve``, each process of ``serve --workers N``,
each ``worker``) joins a lock file beside it, ``<database>-processes.lock``,
with POSIX record locks that the kernel drops when a process ends:

- byte 0, read-locked by every process for its life: its presence. A process
  alone can take it write-locked (and does so only for an instant, to find
  out); anyone else's read lock refuses that.
- byte 1, write-locked by the *sole* process, read-locked by every other.

A process that finds itself alone (byte 1 write-locked, nobody else on
byte 0) delivers early. A newcomer read-locks byte 0, then waits for a read
lock on byte 1, which the sole process holds write-locked: the sole process
sees the newcomer on byte 0 within ``WATCH_SECONDS``, stops early delivery,
writes every delta it had numbered ahead, and only then turns its lock on
byte 1 into a read lock, which lets the newcomer in. So nothing the newcomer
writes can take a number handed out ahead. A process left alone later
(the others stopped) takes byte 1 back and delivers early again.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import unquote

from sqlalchemy.engine import make_url

from app.cancelling import cancel_and_wait

log = logging.getLogger("app.sqlite_peers")

# How often the sole process looks for a newcomer (a newcomer's start waits
# up to about this long, plus writing the deltas numbered ahead).
WATCH_SECONDS = 0.05
# How often a process that shares the file looks whether it is alone again.
REGAIN_SECONDS = 1.0
# How long a newcomer waits for the sole process to let it in.
JOIN_TIMEOUT_SECONDS = 30.0
_RETRY_SECONDS = 0.01
_PRESENCE, _SOLE = 0, 1

# POSIX locks belong to the process, and closing any descriptor of the file
# drops them all: one descriptor per lock file in this process, the Peers
# that opened it owning the locks; more Runtimes on the file in this one
# process (tests) share it and never count as sole.
_descriptors: dict[Path, tuple[int, int]] = {}  # path -> (descriptor, users)


class JoinTimeout(Exception):
    """The process alone on the database did not let this one in."""


def for_url(url: str) -> Peers | None:
    """The Peers of a SQLite database file (None for an in-memory database,
    which no other process can open)."""
    parsed = make_url(url)
    database = parsed.database
    if not database or database == ":memory:" or parsed.query.get("mode") == "memory":
        return None
    if database.startswith("file:"):  # a URI filename (?uri=true): its path, without the URI's query
        database = unquote(database.removeprefix("file:").split("?", 1)[0])
        if not database or database == ":memory:":
            return None
    # Resolved: processes started from different folders must meet on one file.
    return Peers(Path(f"{Path(database).resolve()}-processes.lock"))


class Peers:
    """This process's membership of the database's lock file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sole = False
        self._descriptor = -1
        self._owner = False  # this object holds the process's locks on the file
        self._watcher: asyncio.Task[None] | None = None

    # --------------------------------------------------------------- locks

    def _try(self, kind: int, byte: int) -> bool:
        try:
            fcntl.lockf(self._descriptor, kind | fcntl.LOCK_NB, 1, byte, os.SEEK_SET)
        except OSError:  # EAGAIN/EACCES: another process holds a conflicting lock
            return False
        return True

    def _alone(self) -> bool:
        """No other process on byte 0 (this process's read lock on it stays)."""
        if not self._try(fcntl.LOCK_EX, _PRESENCE):
            return False
        fcntl.lockf(self._descriptor, fcntl.LOCK_SH, 1, _PRESENCE, os.SEEK_SET)  # back to a read lock, at once
        return True

    def _share(self) -> None:
        """Byte 1 from write- to read-locked: lets waiting newcomers in."""
        fcntl.lockf(self._descriptor, fcntl.LOCK_SH, 1, _SOLE, os.SEEK_SET)
        self.sole = False

    def _claim_sole(self) -> bool:
        """Byte 1 write-locked with nobody else present: True (sole). Otherwise
        this process holds byte 1 read-locked, or nothing if it has to wait."""
        if not self._try(fcntl.LOCK_EX, _SOLE):
            return False
        if self._alone():
            self.sole = True
            return True
        self._share()  # a newcomer is waiting for byte 1
        return False

    # --------------------------------------------------------------- life

    async def join(self) -> None:
        """Take this process's place; ``sole`` says whether it is alone."""
        self.path = self.path.resolve()
        shared = _descriptors.get(self.path)
        if shared is not None:  # another Runtime of this process holds the locks
            self._descriptor, users = shared
            _descriptors[self.path] = (self._descriptor, users + 1)
            self._owner = False
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        _descriptors[self.path] = (self._descriptor, 1)
        self._owner = True
        deadline = time.monotonic() + JOIN_TIMEOUT_SECONDS
        # Byte 0: a process checking whether it is alone holds it write-locked for an instant.
        while not self._try(fcntl.LOCK_SH, _PRESENCE):
            await self._retry(deadline)
        if self._claim_sole():
            return
        while not self._try(fcntl.LOCK_SH, _SOLE):  # the sole process lets us in once it stopped numbering ahead
            if self._claim_sole():  # it ended meanwhile
                return
            await self._retry(deadline)

    async def _retry(self, deadline: float) -> None:
        if time.monotonic() > deadline:
            self.close_now()
            raise JoinTimeout(
                f"another server process on this SQLite database did not make room within "
                f"{JOIN_TIMEOUT_SECONDS:.0f} s ({self.path})"
            )
        await asyncio.sleep(_RETRY_SECONDS)

    def watch(self, on_shared: Callable[[], Awaitable[None]], on_sole: Callable[[], None]) -> None:
        """While this process runs: ``on_shared`` (awaited before a newcomer
        is let in) when another process arrives, ``on_sole`` when it is alone again."""
        if not self._owner:
            return
        self._watcher = asyncio.get_running_loop().create_task(
            self._watch(on_shared, on_sole), name="sqlite-peers-watcher"
        )

    async def _watch(self, on_shared: Callable[[], Awaitable[None]], on_sole: Callable[[], None]) -> None:
        while True:
            if self.sole:
                await asyncio.sleep(WATCH_SECONDS)
                if not self._alone():
                    log.info("another server process opened the SQLite database: deltas reach streams once written")
                    try:
                        await on_shared()
                    except Exception as error:  # the newcomer waits on; retried at the next look
                        log.warning("could not write the deltas numbered ahead (%s); retrying", error)
                        if self._alone():  # the newcomer gave up or died meanwhile: early delivery back
                            on_sole()
                        continue
                    self._share()
            else:
                await asyncio.sleep(REGAIN_SECONDS)
                if self._claim_sole():
                    log.info("the only server process on the SQLite database again: deltas reach streams at once")
                    on_sole()

    async def close(self) -> None:
        if self._watcher is not None:
            await cancel_and_wait(self._watcher)
        self.close_now()

    def close_now(self) -> None:
        if self._descriptor < 0:
            return
        descriptor, users = _descriptors.pop(self.path)
        if users > 1:  # other Runtimes of this process still use the file
            _descriptors[self.path] = (descriptor, users - 1)
            if self.sole:
                self._share()
        else:
            os.close(descriptor)  # drops this process's locks
        self._descriptor = -1
        self.sole = False
