"""Every server process on a machine gives its code_interpreter sessions uids
of its own (app/sandbox/uid_ranges.py), however it was started: real
processes, each a Sandboxes manager as `serve`, `serve --workers N` and
`worker` build it, claiming over one lock file."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from app.sandbox import SandboxError, Sandboxes
from app.settings import Settings

pytestmark = pytest.mark.timeout(60)

BASE = 310_000

# One server process's sandbox manager: it claims its range as a first
# session would, prints the range, holds it until stdin closes, then closes.
_CHILD = textwrap.dedent(
    """
    import asyncio, dataclasses, sys
    from pathlib import Path
    from app.sandbox import Sandboxes, launcher_from
    from app.settings import Settings

    async def main() -> None:
        tmp, lock, size, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
        settings = Settings(
            data_dir=tmp / "data", sandbox_dir=tmp / "sandboxes", sandbox_uid_base={base},
            sandbox_max_sessions=size, sandbox_uid_ranges=count, sandbox_uid_lock_file=lock,
        )
        launcher = dataclasses.replace(launcher_from(settings), uid={base})  # as when running as root
        manager = Sandboxes(settings, launcher)
        try:
            uid = manager._free_uid()
        except Exception as error:
            print("refused", error, flush=True)
            return
        assert manager.uids is not None and uid == manager.uids.start
        print("range", manager.uids.start, manager.uids.size, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await manager.close()

    asyncio.run(main())
    """
).format(base=BASE)


@dataclasses.dataclass
class Child:
    process: subprocess.Popen[str]
    answer: list[str]

    @property
    def uids(self) -> range:
        assert self.answer[0] == "range", self.answer
        start, size = int(self.answer[1]), int(self.answer[2])
        return range(start, start + size)


@contextmanager
def children(tmp_path: Path) -> Iterator[list[Child]]:
    started: list[Child] = []
    try:
        yield started
    finally:
        for child in started:
            if child.process.poll() is None:
                child.process.kill()
            child.process.wait(timeout=10)
            assert child.process.stdin is not None and child.process.stdout is not None
            child.process.stdin.close()
            child.process.stdout.close()


def start(started: list[Child], tmp_path: Path, lock: Path, size: int = 8, count: int = 4) -> Child:
    process = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path), str(lock), str(size), str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert process.stdout is not None
    child = Child(process, [])
    started.append(child)
    line = process.stdout.readline()  # the child answers at once; the test's timeout bounds it
    child.answer = line.split()
    assert child.answer, f"the child said nothing (exit status {process.poll()})"
    return child


def test_processes_take_disjoint_uid_ranges_and_a_dead_ones_range_is_reused(tmp_path: Path) -> None:
    lock = tmp_path / "run" / "sandbox-uids.lock"
    with children(tmp_path) as started:
        # `serve` beside two `worker` processes (or three processes of `serve --workers 3`).
        first, second, third = (start(started, tmp_path, lock) for _ in range(3))
        assert [first.uids.start, second.uids.start, third.uids.start] == [BASE, BASE + 8, BASE + 16]

        # A process killed outright: the kernel drops its lock, the next process takes its range.
        second.process.send_signal(signal.SIGKILL)
        second.process.wait(timeout=10)
        assert start(started, tmp_path, lock).uids == second.uids

        # Another server with more sessions per process: no overlap with any held range.
        wider = start(started, tmp_path, lock, size=12)
        held = set(first.uids) | set(second.uids) | set(third.uids)
        assert wider.uids.start == BASE + 24 and not held & set(wider.uids)

        # Every range held: a new session is refused with a clear message, not given a used uid.
        refused = start(started, tmp_path, lock, count=3)
        assert refused.answer[0] == "refused" and "ASSISTANTS_SANDBOX_UID_RANGES" in " ".join(refused.answer)

        # A process that stops gives its range back.
        assert third.process.stdin is not None
        third.process.stdin.close()
        assert third.process.wait(timeout=10) == 0
        assert start(started, tmp_path, lock, count=3).uids == third.uids


def _manager(tmp_path: Path, lock_file: Path) -> Sandboxes:
    """A sandbox manager of this process (as root would run it: uids from
    BASE), 2 ranges of 4 uids locked in ``lock_file``."""
    from app.sandbox import launcher_from

    settings = Settings(
        data_dir=tmp_path / "data",
        sandbox_dir=tmp_path / "sandboxes",
        sandbox_uid_base=BASE,
        sandbox_max_sessions=4,
        sandbox_uid_ranges=2,
        sandbox_uid_lock_file=lock_file,
    )
    return Sandboxes(settings, dataclasses.replace(launcher_from(settings), uid=BASE))


def test_two_managers_in_one_process_do_not_share_a_range(tmp_path: Path) -> None:
    async def scenario() -> None:
        one, two, three = (_manager(tmp_path, tmp_path / "uids.lock") for _ in range(3))
        assert one._free_uid() == BASE and two._free_uid() == BASE + 4  # POSIX locks are per process
        with pytest.raises(SandboxError, match="ASSISTANTS_SANDBOX_UID_RANGES"):
            three._free_uid()
        await one.close()
        assert three._free_uid() == BASE
        await two.close()
        await three.close()

    asyncio.run(scenario())


def test_an_unusable_lock_file_refuses_sessions_and_names_the_setting(tmp_path: Path) -> None:
    """A lock file whose folder cannot be made (a read-only /run) fails
    closed, with an error that says what to set: a fallback elsewhere could
    leave two processes on different files, handing one uid to two sessions."""
    (tmp_path / "run").write_text("not a folder")
    manager = _manager(tmp_path, tmp_path / "run" / "uids.lock")
    with pytest.raises(SandboxError, match="ASSISTANTS_SANDBOX_UID_LOCK_FILE"):
        manager._free_uid()
    asyncio.run(manager.close())
