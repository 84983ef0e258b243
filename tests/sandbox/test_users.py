"""Whose credentials a code_interpreter session runs with on the host, on
either event loop the server may run on. As root, every process of a session
is its own uid, the gid of that number and no supplementary groups (set by
setpriv: uvloop's subprocesses refuse subprocess's user/group arguments, which
kept a root server on asyncio); otherwise it is the server's user."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import uvloop

from app.sandbox import SandboxError, Sandboxes, Session
from app.settings import Settings

DEADLINE = 60.0
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    assert shutil.which("bwrap"), "bubblewrap is required for code_interpreter: apt-get install -y bubblewrap"
    venv = Settings().sandbox_python
    assert (venv / "bin" / "python").exists(), f"no sandbox Python at {venv}: run `assistants-server sandbox-setup`"
    return Settings(data_dir=tmp_path / "data", sandbox_call_timeout_seconds=10)


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {name: value.strip() for name, _, value in (line.partition(":") for line in lines)}


def _session_processes(session: Session) -> list[int]:
    """The host pids of the process the server started and of all its
    descendants (bubblewrap's own, the supervisor, the REPL worker)."""
    assert session.process is not None
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # it ended meanwhile
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm)": state ppid
    found = [session.process.pid]
    for pid in found:
        found += [child for child, parent in parents.items() if parent == pid]
    return found


@pytest.mark.parametrize("mode", ["bwrap", "none"])
@pytest.mark.parametrize("loop", list(LOOPS))
def test_sessions_run_as_their_own_user_on_either_loop(settings: Settings, loop: str, mode: str) -> None:
    async def checked() -> None:
        manager = Sandboxes(settings.model_copy(update={"sandbox": mode}))
        try:
            session = await manager.session("thread_a")
            assert (await session.run("print(6 * 7)")).logs == "42\n"
            pids = _session_processes(session)
            assert len(pids) >= 2, pids  # at least the supervisor and its REPL worker
            if os.geteuid() == 0:
                assert session.uid is not None and session.uid >= settings.sandbox_uid_base
                uid = gid = str(session.uid)
                groups = ""
            else:
                uid, gid = str(os.geteuid()), str(os.getegid())
                groups = " ".join(str(group) for group in os.getgroups())
            for pid in pids:
                status = _status(pid)
                assert status["Uid"].split() == [uid] * 4, status
                assert status["Gid"].split() == [gid] * 4, status
                assert " ".join(status["Groups"].split()) == groups, status
                assert status["CapEff"] == status["CapPrm"] == "0000000000000000", status
        finally:
            await manager.close()

    held = os.getgroups()
    if os.geteuid() == 0:
        os.setgroups([*held, 4242])  # a group the server holds and no session may keep
    try:
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            runner.run(asyncio.wait_for(checked(), DEADLINE))
    finally:
        if os.geteuid() == 0:
            os.setgroups(held)


@pytest.mark.parametrize("mode", ["bwrap", "none"])
@pytest.mark.parametrize("loop", list(LOOPS))
def test_no_inheritable_fd_of_the_server_reaches_a_session(settings: Settings, loop: str, mode: str) -> None:
    """uvloop's subprocesses ignore close_fds: an fd the server holds
    inheritable (as `serve --workers N` holds its listening socket) must
    still reach no process of a session, on either loop."""
    read, write = os.pipe()
    os.set_inheritable(read, True)
    target = os.readlink(f"/proc/self/fd/{read}")

    async def checked() -> None:
        manager = Sandboxes(settings.model_copy(update={"sandbox": mode}))
        try:
            session = await manager.session("thread_a")
            assert (await session.run("print(1)")).logs == "1\n"
            for pid in _session_processes(session):
                held = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
                assert target not in held, (pid, held)
        finally:
            await manager.close()

    try:
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            runner.run(asyncio.wait_for(checked(), DEADLINE))
    finally:
        os.close(read)
        os.close(write)


async def test_without_setpriv_a_root_server_refuses_sessions_clearly(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that would switch users but has no setpriv (util-linux) says
    so at start-up and refuses each session with that reason."""
    base = Sandboxes(settings)
    launcher = dataclasses.replace(base.launcher, uid=settings.sandbox_uid_base, setpriv=None)
    await base.close()
    with caplog.at_level(logging.ERROR, logger="app.sandbox"):
        manager = Sandboxes(settings, launcher)
    try:
        assert "setpriv is not installed" in caplog.text
        with pytest.raises(SandboxError, match=r"setpriv \(util-linux\) is not installed"):
            await asyncio.wait_for(manager.session("thread_a"), DEADLINE)
        assert manager.sessions == {}
    finally:
        await manager.close()
