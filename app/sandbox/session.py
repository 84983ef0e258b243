"""One code_interpreter session: a sandboxed REPL process and its /mnt/data.

The process keeps variables and imports between calls; the directory keeps
files, and outlives a crash or a timeout (the process is restarted, the files
stay, as in a notebook whose kernel died).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.sandbox import launch

log = logging.getLogger("app.sandbox")

# Time to start the REPL and import nothing but the standard library.
START_TIMEOUT_SECONDS = 30.0
# Beyond the REPL's own timeout (which keeps the session), the server waits
# this much longer before it kills the whole sandbox.
KILL_GRACE_SECONDS = 5.0
# The largest protocol line (a result with its base64 PNGs).
MAX_RESULT_BYTES = 64 * 1024 * 1024
# Files at the top of /mnt/data that a call may hand back.
MAX_OUTPUT_FILES = 20
# How often a live session's /mnt/data is measured against its quota (the
# host disk is shared with the database; per-file RLIMIT_FSIZE alone does not
# bound a loop writing many files).
QUOTA_CHECK_SECONDS = 1.0


class SandboxError(Exception):
    """The sandbox could not run the code at all (not an error *in* the code)."""


@dataclass
class OutputFile:
    name: str
    data: bytes


@dataclass
class CallResult:
    logs: str
    error: bool
    images: list[bytes] = field(default_factory=list)
    files: list[OutputFile] = field(default_factory=list)
    restarted: bool = False  # the process died or was killed: variables are gone


@dataclass(frozen=True)
class Launcher:
    mode: launch.Mode
    bwrap: str | None
    venv: Path
    limits: launch.Limits
    uid: int | None  # the host uid sessions run as, when the server can switch users


Snapshot = dict[str, tuple[int, int, int]]


class Session:
    def __init__(self, key: str, directory: Path, launcher: Launcher, uid: int | None) -> None:
        self.key, self.directory, self.launcher, self.uid = key, directory, launcher, uid
        self.process: asyncio.subprocess.Process | None = None
        self.lock = asyncio.Lock()
        self.last_used = time.monotonic()
        self.inputs: dict[str, str] = {}  # file id -> name under /mnt/data
        self.watcher: asyncio.Task[None] | None = None
        self.notice: str | None = None  # what the next call's logs must say first

    @property
    def busy(self) -> bool:
        return self.lock.locked()

    def _command(self) -> tuple[list[str], dict[str, str]]:
        launcher = self.launcher
        if launcher.mode == "bwrap":
            assert launcher.bwrap is not None
            argv = launch.bwrap_argv(launcher.bwrap, launcher.venv, self.directory, launcher.limits)
            return argv, {"PATH": "/usr/bin:/bin"}  # bwrap's own environment: nothing of the server's either
        (self.directory / ".tmp").mkdir(exist_ok=True)
        self._chown(self.directory / ".tmp")
        return launch.unisolated_argv(launcher.venv, launcher.limits), launch.unisolated_env(self.directory)

    async def _spawn(self) -> None:
        argv, env = self._command()
        ids: dict[str, Any] = {} if self.uid is None else {"user": self.uid, "group": self.uid, "extra_groups": []}
        self.process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=str(self.directory),
            start_new_session=True,
            limit=MAX_RESULT_BYTES,
            **ids,
        )
        self.watcher = asyncio.create_task(self._watch_quota())
        try:
            ready = await asyncio.wait_for(self._read(), START_TIMEOUT_SECONDS)
        except (TimeoutError, SandboxError, ValueError) as exc:
            stderr = await self._kill()
            raise SandboxError(f"the sandbox did not start: {stderr or exc}") from None
        if ready.get("type") != "ready":
            await self._kill()
            raise SandboxError(f"the sandbox did not start: {ready.get('message', 'unexpected greeting')}")

    async def _read(self) -> dict[str, Any]:
        assert self.process is not None and self.process.stdout is not None
        line = await self.process.stdout.readline()
        if not line:
            raise SandboxError("the sandbox process exited")
        message: dict[str, Any] = json.loads(line)
        return message

    async def _kill(self) -> str:
        """Kill the process (its PID namespace dies with it); returns what it wrote to stderr."""
        process, self.process = self.process, None
        watcher, self.watcher = self.watcher, None
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
        if process is None:
            return ""
        if process.stdin is not None:
            process.stdin.close()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        # Drain both pipes to their end, so asyncio closes the transport now
        # rather than complaining about it at garbage collection.
        assert process.stdout is not None and process.stderr is not None
        try:
            _, stderr, _ = await asyncio.wait_for(
                asyncio.gather(process.stdout.read(), process.stderr.read(), process.wait()), KILL_GRACE_SECONDS
            )
        except TimeoutError:
            stderr = b""
        stderr = stderr[-4096:]
        return stderr.decode("utf-8", "replace").strip()

    def usage(self) -> int:
        """Disk blocks /mnt/data uses (links are counted, never followed)."""
        total = 0
        for root, dirs, names in os.walk(self.directory):
            for name in [*dirs, *names]:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(root, name)).st_blocks * 512
        return total

    async def _watch_quota(self) -> None:
        """Stop the session and delete its files once /mnt/data outgrows its quota."""
        limit = self.launcher.limits.max_data_bytes
        while True:
            await asyncio.sleep(QUOTA_CHECK_SECONDS)
            if await asyncio.to_thread(self.usage) > limit:
                break
        self.notice = (
            f"The session was stopped because /mnt/data grew beyond {limit} bytes; "
            "its files were deleted and variables are gone."
        )
        if self.busy and self.process is not None:
            # A call is reading the process's output: kill it and let the call
            # find the end of the output, clean up and report.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        else:
            await self._kill()
        self._wipe()

    def _wipe(self) -> None:
        for entry in list(self.directory.iterdir()):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        self.inputs.clear()

    async def close(self) -> None:
        await self._kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _chown(self, path: Path) -> None:
        if self.uid is not None:
            os.chown(path, self.uid, self.uid)

    def add_input(self, file_id: str, filename: str, source: Path) -> None:
        """Copy an input file to /mnt/data/<filename> (once per session).

        Written beside the target and renamed over it, so a symlink the
        sandboxed code left under that name is replaced, never followed."""
        if file_id in self.inputs:
            return
        name = _safe_name(filename, file_id)
        if name in self.inputs.values():
            name = f"{file_id}-{name}"
        temp = self.directory / f".input-{secrets.token_hex(8)}"
        with (
            source.open("rb") as reader,
            open(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb") as writer,
        ):
            shutil.copyfileobj(reader, writer)
        self._chown(temp)
        try:
            os.replace(temp, self.directory / name)
        except OSError:
            temp.unlink(missing_ok=True)  # the code made a directory of that name
            return
        self.inputs[file_id] = name

    async def run(self, code: str) -> CallResult:
        async with self.lock:
            self.last_used = time.monotonic()
            try:
                return await self._run(code)
            finally:
                self.last_used = time.monotonic()

    async def _run(self, code: str) -> CallResult:
        notice, self.notice = self.notice, None  # something happened since the last call
        result = await self._call(code)
        if notice:
            result.logs, result.restarted = f"{notice}\n{result.logs}", True
        return result

    async def _call(self, code: str) -> CallResult:
        restarted = False
        if self.process is None or self.process.returncode is not None:
            restarted = self.process is not None
            await self._kill()
            await self._spawn()
        assert self.process is not None and self.process.stdin is not None
        before = self._snapshot()
        self.process.stdin.write(json.dumps({"code": code}).encode() + b"\n")
        limits = self.launcher.limits
        try:
            await self.process.stdin.drain()
            reply = await asyncio.wait_for(self._read(), limits.timeout_seconds + KILL_GRACE_SECONDS)
        except TimeoutError:
            await self._kill()
            logs = (
                f"Execution timed out after {limits.timeout_seconds} seconds and the session was restarted: "
                "variables and imports are gone, files in /mnt/data remain."
            )
            return CallResult(logs, True, files=self._collect(before), restarted=True)
        except (SandboxError, ValueError, ConnectionError) as exc:
            stderr = await self._kill()
            if self.notice:  # stopped by the quota watch
                self._wipe()  # again: the last writes may have landed after its wipe
                logs, self.notice = self.notice, None
                return CallResult(logs, True, restarted=True)
            logs = (
                f"The Python session crashed ({stderr or exc}) and was restarted: "
                "variables and imports are gone, files in /mnt/data remain."
            )
            return CallResult(logs, True, files=self._collect(before), restarted=True)
        return self._result(reply, before, restarted)

    def _result(self, reply: dict[str, Any], before: Snapshot, restarted: bool) -> CallResult:
        logs = str(reply.get("logs", ""))
        total, kept = int(reply.get("total", 0)), len(logs.encode("utf-8"))
        if total > kept:
            logs += f"\n[output truncated: {total - kept} more bytes not shown]"
        images = [base64.b64decode(image) for image in reply.get("images", [])]
        return CallResult(logs, bool(reply.get("error")), images, self._collect(before), restarted)

    def _snapshot(self) -> Snapshot:
        """Regular files at the top of /mnt/data (never following links)."""
        found: Snapshot = {}
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return found
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                found[entry.name] = (info.st_size, info.st_mtime_ns, info.st_ino)
        return found

    def _collect(self, before: Snapshot) -> list[OutputFile]:
        """Files the call created or changed; read with O_NOFOLLOW so a link
        swapped in meanwhile cannot make the server read its own files."""
        changed = [name for name, mark in self._snapshot().items() if before.get(name) != mark]
        files: list[OutputFile] = []
        budget = self.launcher.limits.max_file_bytes  # for all of a call's files together
        for name in sorted(changed)[:MAX_OUTPUT_FILES]:
            data = _read_regular(self.directory / name, budget)
            if data is not None and len(data) < budget:
                files.append(OutputFile(name, data))
                budget -= len(data)
        return files


def _read_regular(path: Path, limit: int) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with open(fd, "rb") as reader:
        if not stat.S_ISREG(os.fstat(reader.fileno()).st_mode):
            return None
        return reader.read(limit + 1)[:limit]


def _safe_name(filename: str, fallback: str) -> str:
    """The last path component, never hidden, never empty."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].strip().lstrip(".")
    name = "".join(char for char in name if char.isprintable())
    return name[:200] or fallback
