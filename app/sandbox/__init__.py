"""Sandboxed Python sessions for code_interpreter: the only module that spawns
sandbox processes.

``Sandboxes`` keeps one session per key (a thread id), starts it on first
use, reclaims it after an idle period or when its thread is deleted, and caps
how many exist at once. See launch.py for what the sandbox can see and
kernel.py for the REPL inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import stat
import tempfile
import time
import weakref
from pathlib import Path

from app.sandbox import launch, uid_ranges
from app.sandbox.session import CallResult, Launcher, OutputFile, SandboxError, Session
from app.settings import Settings

__all__ = ["CallResult", "OutputFile", "SandboxError", "Sandboxes", "Session"]

log = logging.getLogger("app.sandbox")

UNISOLATED_WARNING = (
    "!!! ASSISTANTS_SANDBOX=none: code_interpreter runs model-written code WITHOUT ISOLATION, "
    "as the server's own user, with its files, network and environment in reach. "
    "Use this only on a disposable development machine. !!!"
)


def launcher_from(settings: Settings) -> Launcher:
    limits = launch.Limits(
        timeout_seconds=settings.sandbox_call_timeout_seconds,
        cpu_seconds=settings.sandbox_cpu_seconds,
        session_cpu_seconds=settings.sandbox_session_cpu_seconds,
        memory_bytes=settings.sandbox_memory_bytes,
        max_processes=settings.sandbox_max_processes,
        max_open_files=settings.sandbox_max_open_files,
        max_file_bytes=settings.sandbox_max_file_bytes,
        max_output_bytes=settings.sandbox_max_output_bytes,
        tmp_bytes=settings.sandbox_tmp_bytes,
        max_data_bytes=settings.sandbox_max_data_bytes,
        session_memory_bytes=settings.sandbox_session_memory_bytes,
    )
    # Root can give each session a uid of its own; then RLIMIT_NPROC (which
    # never binds root) applies and sessions cannot signal one another.
    uid = settings.sandbox_uid_base if os.geteuid() == 0 else None
    setpriv = launch.find_setpriv() if uid is not None else None
    return Launcher(settings.sandbox, launch.find_bwrap(), settings.sandbox_python, limits, uid, setpriv)


# Every live manager, so a shutdown (or a test) can end all sessions at once.
_managers: weakref.WeakSet[Sandboxes] = weakref.WeakSet()


def _on_this_loop() -> list[Sandboxes]:
    """The live managers whose sessions run on the running event loop (or
    that have none yet). A session's process and reaper belong to the loop
    that started them; a server running in another thread of this process
    ends its own (awaiting them here raised "attached to a different loop")."""
    loop = asyncio.get_running_loop()
    return [manager for manager in list(_managers) if manager.loop in (None, loop)]


async def close_all() -> None:
    """End every session of every manager of this event loop (server shutdown)."""
    for manager in _on_this_loop():
        await manager.close()


async def forget(key: str) -> None:
    """A thread was deleted: end its session (and delete its files) wherever
    this server holds one. Sessions of a worker in another process are
    reclaimed by their idle timeout instead."""
    for manager in _on_this_loop():
        await manager.discard(key)


class Sandboxes:
    def __init__(self, settings: Settings, launcher: Launcher | None = None) -> None:
        _managers.add(self)
        self.launcher = launcher or launcher_from(settings)
        self.idle_seconds = settings.sandbox_idle_seconds
        self.max_sessions = settings.sandbox_max_sessions
        self.uid_lock_file = settings.sandbox_uid_lock_file
        self.uid_range_count = settings.sandbox_uid_ranges
        # This process's uids, claimed with its first session (uid_ranges.py).
        self.uids: uid_ranges.UidRange | None = None
        base = settings.sandbox_dir or Path(tempfile.gettempdir()) / f"assistants-sandbox-{os.geteuid()}"
        self.root = base.resolve() / f"{os.getpid()}-{secrets.token_hex(4)}"
        self.sessions: dict[str, Session] = {}
        self._creating = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None
        # The event loop of this manager's sessions, from the first one on.
        self.loop: asyncio.AbstractEventLoop | None = None
        self._check(settings, base.resolve())

    def _check(self, settings: Settings, base: Path) -> None:
        """Say loudly at start-up what is wrong, before the first model call."""
        data_dir = settings.data_dir.resolve()
        if base == data_dir or data_dir in base.parents:
            raise ValueError(f"sandbox_dir {base} must not be inside the data directory {data_dir}")
        if self.launcher.mode == "none":
            log.warning(UNISOLATED_WARNING)
        elif self.launcher.bwrap is None:
            log.error(
                "code_interpreter is unavailable: bubblewrap (bwrap) is not installed (apt-get install bubblewrap)"
            )
        if self.launcher.uid is not None and self.launcher.setpriv is None:
            log.error(
                "code_interpreter is unavailable: sessions run as other users and setpriv is not installed "
                "(apt-get install util-linux)"
            )
        if self.launcher.uid is not None:
            for path in (self.launcher.venv, launch.KERNEL):
                if not _world_readable(path.resolve()):
                    log.error("code_interpreter is unavailable: sessions run as other users and cannot read %s", path)
        if not (self.launcher.venv / "bin" / "python").exists():
            log.error(
                "code_interpreter is unavailable: no sandbox Python at %s (run: assistants-server sandbox-setup)",
                self.launcher.venv,
            )

    def _prepare_root(self) -> None:
        if self.root.exists():
            return
        self.root.parent.mkdir(parents=True, exist_ok=True)
        self.root.parent.chmod(0o711)  # sessions may enter their own directory, not list others
        self.root.mkdir(mode=0o711)
        _remove_stale(self.root.parent)

    def _free_uid(self) -> int | None:
        """A uid of this process's range that no live session runs as (None:
        run as the server's user). The range is claimed on first use, so a
        process that never runs code holds none."""
        base = self.launcher.uid
        if base is None:
            return None
        if self.uids is None:
            try:
                self.uids = uid_ranges.claim(self.uid_lock_file, base, self.max_sessions, self.uid_range_count)
            except uid_ranges.NoFreeRange as error:
                raise SandboxError(f"no sandbox uids for a new session: {error}") from error
            except OSError as error:
                raise SandboxError(
                    f"no sandbox uids for a new session: the uid lock file {self.uid_lock_file} is unusable "
                    f"({error}); set ASSISTANTS_SANDBOX_UID_LOCK_FILE to a path that every server process "
                    "of this machine can write"
                ) from error
        used = {session.uid for session in self.sessions.values()}
        return next(uid for uid in self.uids.uids if uid not in used)  # sessions <= max_sessions: one is free

    async def session(self, key: str) -> Session:
        """The live session for ``key``, created (not yet started) if needed."""
        async with self._creating:
            self.loop = asyncio.get_running_loop()
            session = self.sessions.get(key)
            if session is None:
                session = await self._create(key)
            session.last_used = time.monotonic()
            self._start_reaper()
            return session

    async def _create(self, key: str) -> Session:
        if self.launcher.mode == "bwrap" and self.launcher.bwrap is None:
            raise SandboxError("bubblewrap (bwrap) is not installed on the server")
        if self.launcher.uid is not None and self.launcher.setpriv is None:
            raise SandboxError("setpriv (util-linux) is not installed on the server: sessions cannot switch users")
        if len(self.sessions) >= self.max_sessions and not await self._evict():
            raise SandboxError(f"all {self.max_sessions} sandbox sessions are busy; try again shortly")
        self._prepare_root()
        uid = self._free_uid()
        directory = self.root / f"s{secrets.token_hex(8)}"
        directory.mkdir(mode=0o700)
        if uid is not None:
            os.chown(directory, uid, uid)
        session = Session(key, directory, self.launcher, uid)
        self.sessions[key] = session
        return session

    async def _evict(self) -> bool:
        """Close the least recently used idle session to make room."""
        idle = [session for session in self.sessions.values() if not session.busy]
        if not idle:
            return False
        oldest = min(idle, key=lambda session: session.last_used)
        await self.discard(oldest.key)
        return True

    async def discard(self, key: str) -> None:
        """End a session and delete its files (thread deleted, idle, evicted)."""
        session = self.sessions.pop(key, None)
        if session is not None:
            await session.close()

    async def reap_idle(self) -> None:
        deadline = time.monotonic() - self.idle_seconds
        for key, session in list(self.sessions.items()):
            if not session.busy and session.last_used < deadline:
                log.info("closing idle code_interpreter session of %s", key)
                await self.discard(key)

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap_forever())

    async def _reap_forever(self) -> None:
        while self.sessions:
            await asyncio.sleep(min(max(self.idle_seconds / 4, 0.05), 60))
            await self.reap_idle()

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for key in list(self.sessions):
            await self.discard(key)
        shutil.rmtree(self.root, ignore_errors=True)
        if self.uids is not None:  # every session that ran as them has ended
            uid_ranges.release(self.uids)
            self.uids = None


def _world_readable(path: Path) -> bool:
    """Whether a session's uid (any other user) can reach ``path``: bubblewrap
    binds it with the session's credentials, so a venv under /root fails."""
    try:
        if not path.stat().st_mode & stat.S_IROTH:
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in path.parents)
    except OSError:
        return False


def _remove_stale(parent: Path) -> None:
    """Session folders of servers that are gone (their name starts with their pid)."""
    for entry in parent.iterdir():
        pid = entry.name.partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
