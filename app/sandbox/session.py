"""One code_interpreter session: a sandboxed REPL and its /mnt/data.

The REPL's worker process keeps variables and imports between calls; its
supervisor (kernel.py) keeps /mnt/data, a size-capped tmpfs that outlives a
crash or a timeout of the worker (the worker is restarted, the files stay, as
in a notebook whose kernel died). Only when the whole sandbox must be killed
(it stopped answering) are the files lost with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.sandbox import launch, seccomp

log = logging.getLogger("app.sandbox")

# Time to start the REPL and import nothing but the standard library.
START_TIMEOUT_SECONDS = 30.0
# The supervisor inside ends a call that overruns (timeout + its own grace);
# the server kills the whole sandbox only if even that answer does not come.
SUPERVISOR_GRACE_SECONDS = 15.0
KILL_GRACE_SECONDS = 5.0
# The largest protocol header line (a result with its logs).
MAX_HEADER_BYTES = 16 * 1024 * 1024
# Images and files of one answer, as counted and bounded inside (kernel.py).
MAX_BLOBS = 10 + 20
MAX_IMAGE_BYTES = 16 * 1024 * 1024
# Staged input files, bound read-only into the sandbox.
INPUTS = ".inputs"


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
    setpriv: str | None  # the program that switches to it (launch.as_user); None: not installed


@dataclass
class Message:
    """One answer of the supervisor: its JSON header and the bytes after it."""

    header: dict[str, Any]
    blobs: list[bytes]


class Session:
    def __init__(self, key: str, directory: Path, launcher: Launcher, uid: int | None) -> None:
        self.key, self.directory, self.launcher, self.uid = key, directory, launcher, uid
        self.process: asyncio.subprocess.Process | None = None
        self.lock = asyncio.Lock()
        self.last_used = time.monotonic()
        self.inputs: dict[str, str] = {}  # file id -> name under /mnt/data
        self.notices: list[str] = []  # what the next call's logs must say first

    @property
    def busy(self) -> bool:
        return self.lock.locked()

    @property
    def staging(self) -> Path:
        return self.directory / INPUTS

    def _command(self, seccomp_fd: int) -> tuple[list[str], dict[str, str]]:
        launcher = self.launcher
        if launcher.mode == "bwrap":
            assert launcher.bwrap is not None
            argv = launch.bwrap_argv(launcher.bwrap, launcher.venv, self.staging, launcher.limits, seccomp_fd)
            return argv, {"PATH": "/usr/bin:/bin"}  # bwrap's own environment: nothing of the server's either
        (self.directory / ".tmp").mkdir(exist_ok=True)
        self._chown(self.directory / ".tmp")
        return launch.unisolated_argv(launcher.venv, launcher.limits), launch.unisolated_env(self.directory)

    async def _spawn(self) -> None:
        self.staging.mkdir(exist_ok=True)
        self._chown(self.staging)
        filter_fd = -1
        if self.launcher.mode == "bwrap":
            try:
                filter_fd = _memfd(seccomp.program())
            except seccomp.UnsupportedArchitecture as exc:
                raise SandboxError(str(exc)) from None
        try:
            argv, env = self._command(filter_fd)
            self.process = await asyncio.create_subprocess_exec(
                *self._as_session_user(argv),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=str(self.directory),
                start_new_session=True,
                limit=MAX_HEADER_BYTES,
                pass_fds=[filter_fd] if filter_fd >= 0 else [],
            )
        finally:
            if filter_fd >= 0:
                os.close(filter_fd)
        self.inputs.clear()  # a new sandbox has an empty /mnt/data
        try:
            ready = await asyncio.wait_for(self._read(), START_TIMEOUT_SECONDS)
        except (TimeoutError, SandboxError, ValueError) as exc:
            stderr = await self._kill()
            raise SandboxError(f"the sandbox did not start: {stderr or exc}") from None
        if ready.header.get("type") != "ready":
            await self._kill()
            raise SandboxError(f"the sandbox did not start: {ready.header.get('message', 'unexpected greeting')}")

    def _as_session_user(self, argv: list[str]) -> list[str]:
        if self.uid is None:
            return argv
        assert self.launcher.setpriv is not None  # Sandboxes refuses to create a session without it
        return launch.as_user(self.launcher.setpriv, self.uid, argv)

    async def _read(self) -> Message:
        assert self.process is not None and self.process.stdout is not None
        stdout = self.process.stdout
        line = await stdout.readline()
        if not line:
            raise SandboxError("the sandbox process exited")
        header: dict[str, Any] = json.loads(line)
        sizes = [int(size) for size in header.get("blobs", [])]
        limit = max(MAX_IMAGE_BYTES, self.launcher.limits.max_file_bytes)
        if len(sizes) > MAX_BLOBS or any(not 0 <= size <= limit for size in sizes):
            raise SandboxError("the sandbox broke its protocol")
        return Message(header, [await stdout.readexactly(size) for size in sizes])

    async def _request(self, request: dict[str, Any], seconds: float) -> Message:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        await self.process.stdin.drain()
        return await asyncio.wait_for(self._read(), seconds)

    async def _kill(self) -> str:
        """Kill the sandbox (its PID namespace dies with it); returns what it wrote to stderr."""
        process, self.process = self.process, None
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

    async def close(self) -> None:
        await self._kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _chown(self, path: Path) -> None:
        if self.uid is not None:
            os.chown(path, self.uid, self.uid)

    async def _ensure_started(self) -> bool:
        """Start the sandbox if it is not running; whether it was running before and died."""
        if self.process is not None and self.process.returncode is None:
            return False
        died = self.process is not None
        await self._kill()
        await self._spawn()
        return died

    async def add_input(self, file_id: str, filename: str, source: Path) -> None:
        """Copy an input file to /mnt/data/<filename> (once per sandbox): the
        server stages it read-only for the sandbox, the supervisor inside
        copies it into its /mnt/data (which only it can see)."""
        async with self.lock:
            self.last_used = time.monotonic()
            if await self._ensure_started():
                self.notices.append(self._lost_notice())
            if file_id in self.inputs:
                return
            name = _safe_name(filename, file_id)
            if name in self.inputs.values():
                name = f"{file_id}-{name}"
            token = secrets.token_hex(8)
            staged = self.staging / token
            await asyncio.to_thread(_copy, source, staged)
            self._chown(staged)
            inside = f"{launch.INSIDE_INPUTS}/{token}" if self.launcher.mode == "bwrap" else str(staged)
            try:
                answer = await self._request({"type": "input", "source": inside, "name": name}, START_TIMEOUT_SECONDS)
            except (TimeoutError, SandboxError, ValueError, ConnectionError, asyncio.IncompleteReadError) as exc:
                await self._kill()
                raise SandboxError(f"the sandbox stopped while receiving {name}: {exc}") from None
            finally:
                staged.unlink(missing_ok=True)
            if answer.header.get("ok"):
                self.inputs[file_id] = name
            else:
                self.notices.append(
                    f"The file {name} could not be copied to /mnt/data: {answer.header.get('message')}."
                )

    async def run(self, code: str) -> CallResult:
        async with self.lock:
            self.last_used = time.monotonic()
            try:
                return await self._run(code)
            finally:
                self.last_used = time.monotonic()

    async def _run(self, code: str) -> CallResult:
        restarted = await self._ensure_started()
        if restarted:
            self.notices.append(self._lost_notice())
        notices, self.notices = self.notices, []  # something happened since the last call
        result = await self._call(code)
        if notices:
            result.logs = "\n".join([*notices, result.logs])
        result.restarted = result.restarted or restarted
        return result

    def _lost_notice(self) -> str:
        return "The sandbox had stopped and was started again: variables, imports and files in /mnt/data are gone."

    async def _call(self, code: str) -> CallResult:
        limits = self.launcher.limits
        try:
            answer = await self._request(
                {"type": "run", "code": code}, limits.timeout_seconds + SUPERVISOR_GRACE_SECONDS
            )
        except TimeoutError:
            await self._kill()
            logs = (
                f"Execution timed out after {limits.timeout_seconds} seconds and the sandbox was restarted: "
                "variables, imports and files in /mnt/data are gone."
            )
            return CallResult(logs, True, restarted=True)
        except (SandboxError, ValueError, ConnectionError, asyncio.IncompleteReadError) as exc:
            stderr = await self._kill()
            logs = (
                f"The sandbox crashed ({stderr or exc}) and was restarted: "
                "variables, imports and files in /mnt/data are gone."
            )
            return CallResult(logs, True, restarted=True)
        return _result(answer)


def _result(answer: Message) -> CallResult:
    header = answer.header
    logs = str(header.get("logs", ""))
    total, kept = int(header.get("total", 0)), len(logs.encode("utf-8"))
    if total > kept:
        logs += f"\n[output truncated: {total - kept} more bytes not shown]"
    notes = [str(note) for note in header.get("notes", [])]
    if notes:
        logs = "\n".join([logs, *notes]) if logs else "\n".join(notes)
    count = int(header.get("images", 0))
    images, blobs = answer.blobs[:count], answer.blobs[count:]
    names = [str(name) for name in header.get("files", [])]
    files = [OutputFile(name, data) for name, data in zip(names, blobs, strict=False) if name == _safe_name(name, "")]
    return CallResult(logs, bool(header.get("error")), images, files, bool(header.get("restarted")))


def _memfd(data: bytes) -> int:
    """An anonymous file holding ``data``, read from its start by bwrap."""
    fd = os.memfd_create("sandbox-seccomp", os.MFD_CLOEXEC)  # pass_fds hands it to bwrap alone
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _copy(source: Path, target: Path) -> None:
    with source.open("rb") as reader, target.open("xb") as writer:
        shutil.copyfileobj(reader, writer)


def _safe_name(filename: str, fallback: str) -> str:
    """The last path component, never hidden, never empty."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].strip().lstrip(".")
    name = "".join(char for char in name if char.isprintable())
    return name[:200] or fallback
