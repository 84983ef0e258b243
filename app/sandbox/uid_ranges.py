"""Host uids for code_interpreter sessions: each server process on a machine
takes a range of its own (issue 17: ``serve --workers N``, ``serve`` beside
``worker`` processes, several servers on one host).

A session's uid is what its process limit (RLIMIT_NPROC) counts against and
what keeps sessions from signalling one another, so two live sessions must
never share one, whichever process started them. Uids are a resource of the
machine, not of a database, so the claim is made on the machine: a POSIX
write lock on the byte range ``[start, start + size)`` of one lock file
(``sandbox_uid_lock_file``), the byte offsets being the uids themselves.
Locks on overlapping ranges conflict, so processes started with different
bases or session counts still never share a uid; the kernel drops a dead
process's locks (its sessions died with it: bubblewrap's
``--die-with-parent``). POSIX locks are per process, so the ranges this
process holds are also kept here (two managers in one process, as in tests).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("app.sandbox")


class NoFreeRange(Exception):
    """Every range is held by another process on this machine."""


@dataclass(frozen=True)
class UidRange:
    lock_file: Path
    start: int
    size: int

    @property
    def uids(self) -> range:
        return range(self.start, self.start + self.size)


_guard = threading.Lock()
# Open descriptors of the lock files: kept for the life of the process,
# since closing any descriptor of a file drops all of the process's locks on it.
_descriptors: dict[Path, int] = {}
_held: set[UidRange] = set()


def _descriptor(lock_file: Path) -> int:
    # No fallback elsewhere when this fails: processes that locked different
    # files could hand one uid to two sessions (isolation fails closed).
    descriptor = _descriptors.get(lock_file)
    if descriptor is None:
        lock_file.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        descriptor = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        _descriptors[lock_file] = descriptor
    return descriptor


def claim(lock_file: Path, base: int, size: int, count: int) -> UidRange:
    """The first free range of ``size`` uids among ``count`` from ``base``,
    held until release() or the end of this process."""
    lock_file = lock_file.resolve()
    with _guard:
        descriptor = _descriptor(lock_file)
        for index in range(count):
            candidate = UidRange(lock_file, base + index * size, size)
            if any(held.lock_file == lock_file and _overlap(held, candidate) for held in _held):
                continue
            try:
                fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB, size, candidate.start, os.SEEK_SET)
            except OSError:  # EAGAIN/EACCES: another process holds part of it
                continue
            _held.add(candidate)
            log.info(
                "code_interpreter sessions of this process run as uids %d-%d",
                candidate.start,
                candidate.start + size - 1,
            )
            return candidate
    last = base + count * size - 1
    raise NoFreeRange(
        f"every range of {size} sandbox uids in {base}-{last} is held by another server process on this machine "
        "(raise ASSISTANTS_SANDBOX_UID_RANGES)"
    )


def release(held: UidRange) -> None:
    with _guard:
        if held not in _held:
            return
        _held.discard(held)
        fcntl.lockf(_descriptors[held.lock_file], fcntl.LOCK_UN, held.size, held.start, os.SEEK_SET)


def _overlap(a: UidRange, b: UidRange) -> bool:
    return a.start < b.start + b.size and b.start < a.start + a.size
