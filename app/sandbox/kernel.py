"""The in-sandbox side of a code_interpreter session.

This file runs *inside* the sandbox under the sandbox's own Python, so it
imports nothing from the server. It is deliberately small instead of a
Jupyter kernel: a kernel talks over ZeroMQ sockets, which a private network
namespace cannot share with the host, while this speaks over pipes.

Two processes, so that model code never holds the channel to the server:

- The **supervisor** (this script's first process; PID 1 of the sandbox's
  PID namespace under bubblewrap) owns the protocol: JSON-line requests on
  fd 0, answers on fd 1. It marks itself non-dumpable, so no process of the
  same uid can open its ``/proc/1/fd`` (and ptrace is blocked by the seccomp
  filter), and SIGKILL sent from inside the namespace does not reach a PID 1.
  It enforces the call's wall clock, the session's CPU, memory and process
  budgets over all its descendants, kills every process a call started when
  the call returns, and reads output files back itself.
- The **worker**, forked from it, is the persistent REPL that runs the code
  (variables and imports persist between calls). Its fd 0 is /dev/null, fds
  1 and 2 are a capture pipe the supervisor drains (plain data, never
  parsed), and its only other channel is a private pipe pair to the
  supervisor, whose answers the supervisor validates: model code that forges
  an answer there forges nothing but its own call's error flag and images.

Protocol (server <-> supervisor): requests ``{"type": "run", "code": ...}`` and
``{"type": "input", "source": path, "name": name}``, one per line. Every answer
is a JSON header line with ``"blobs": [n, ...]``, followed by that many raw
byte strings of those lengths (images, then files, for a run).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import io
import json
import os
import resource
import select
import signal
import stat
import sys
import time
import traceback
from types import FrameType
from typing import Any

MNT_DATA = os.environ.get("SANDBOX_MNT_DATA", "/mnt/data")
# Beyond its own timeout (which keeps the worker), the supervisor waits this
# much longer before it kills the worker and starts a new one.
KILL_GRACE_SECONDS = 5.0
# How often a running call is measured against its budgets.
POLL_SECONDS = 0.1
# Figures returned per call (the rest are closed unseen), and the largest one.
MAX_FIGURES = 10
MAX_IMAGE_BYTES = 16 * 1024 * 1024
# The largest answer header the worker may send.
MAX_HEADER_BYTES = 64 * 1024
# Files at the top of /mnt/data that a call may hand back.
MAX_OUTPUT_FILES = 20
# A file counts as sparse when it stores this much less than its size claims.
SPARSE_SLACK_BYTES = 64 * 1024
PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 4, 36
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


class CallTimeout(BaseException):
    """Raised in user code when its wall-clock or CPU budget runs out.

    A BaseException, so a bare ``except Exception`` in model code does not
    swallow it."""


# --- the worker: runs the code ----------------------------------------------


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    reason = "CPU time limit" if signum == signal.SIGXCPU else "time limit"
    raise CallTimeout(f"Execution stopped: the call exceeded its {reason}.")


def _set_limits(config: dict[str, int], cpu_left: int) -> None:
    """Hard limits, lowered before any user code runs: nothing in here can raise them again."""
    for name, key in (
        ("RLIMIT_AS", "memory_bytes"),
        ("RLIMIT_NPROC", "max_processes"),
        ("RLIMIT_NOFILE", "max_open_files"),
        ("RLIMIT_FSIZE", "max_file_bytes"),
        ("RLIMIT_CORE", "core"),
    ):
        value = config.get(key, 0)
        resource.setrlimit(getattr(resource, name), (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_left, cpu_left))


def _cpu_used() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return int(usage.ru_utime + usage.ru_stime) + 1


def _figures() -> list[bytes]:
    """Every open matplotlib figure as PNG, then closed (plt.show() and savefig alike)."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return []
    images = []
    for number in pyplot.get_fignums()[:MAX_FIGURES]:
        buffer = io.BytesIO()
        pyplot.figure(number).savefig(buffer, format="png")
        images.append(buffer.getvalue())
    pyplot.close("all")
    return images


def _reap_children() -> None:
    """Collect the children of earlier calls, all killed by the supervisor when
    their call returned: unreaped, they would count against RLIMIT_NPROC."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Repl:
    def __init__(self, config: dict[str, int], requests: int, answers: int) -> None:
        self.config, self.requests, self.answers = config, requests, answers
        self.namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
        self.stdout, self.stderr = sys.stdout, sys.stderr
        self.pid = os.getpid()

    def serve(self) -> None:
        for line in os.fdopen(self.requests, "rb"):
            request = json.loads(line)
            error, images = self.execute(request["code"])
            header = {"nonce": request["nonce"], "error": error, "blobs": [len(image) for image in images]}
            _write_all(self.answers, json.dumps(header).encode() + b"\n" + b"".join(images))

    def execute(self, code: str) -> tuple[bool, list[bytes]]:
        error = False
        _reap_children()
        sys.stdout, sys.stderr = self.stdout, self.stderr  # undo redirections of the previous cell
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        resource.setrlimit(resource.RLIMIT_CPU, (min(_cpu_used() + self.config["cpu_seconds"], hard), hard))
        signal.alarm(self.config["timeout_seconds"])
        try:
            self._run(code)
        except BaseException:  # anything user code raises, SystemExit included, is its output
            error = True
            self._report(sys.exc_info())
        finally:
            if os.getpid() != self.pid:
                os._exit(1)  # a child the cell forked must not go on as a second REPL
            signal.alarm(0)
        images = self._images()
        sys.stdout.flush()
        sys.stderr.flush()
        return error, images

    def _run(self, code: str) -> None:
        """Like a notebook cell: a trailing expression's value is printed."""
        import ast

        tree = ast.parse(code, "<cell>", "exec")
        last = tree.body[-1] if tree.body else None
        if isinstance(last, ast.Expr):
            tree.body.pop()
        exec(compile(tree, "<cell>", "exec"), self.namespace)
        if isinstance(last, ast.Expr):
            value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), self.namespace)
            if value is not None:
                print(repr(value))

    def _report(self, info: Any) -> None:
        kind, value, tb = info
        # Drop the REPL's own frames: the model should see only its cell.
        report = traceback.TracebackException(kind, value, tb)
        report.stack = traceback.StackSummary.from_list([f for f in report.stack if f.filename != __file__])
        sys.stderr.write("".join(report.format()))

    def _images(self) -> list[bytes]:
        signal.alarm(self.config["timeout_seconds"])  # a pathological figure must not hang the call
        try:
            return _figures()
        except BaseException:
            self._report(sys.exc_info())
            return []
        finally:
            signal.alarm(0)


def _prepare_home() -> None:
    """Seed matplotlib's font cache (built by scripts/sandbox-setup) into the
    private, writable config dir, so the first plot does not rebuild it."""
    import shutil
    import warnings

    target = os.environ.get("MPLCONFIGDIR")
    seed = os.path.join(sys.prefix, "mplconfig")
    if target and os.path.isdir(seed) and not os.path.exists(target):
        shutil.copytree(seed, target)
    # plt.show() under Agg is how figures are returned here, not a mistake.
    warnings.filterwarnings("ignore", message=".*non-interactive.*")


def _worker_main(config: dict[str, int], cpu_left: int, capture: int, requests: int, answers: int) -> None:
    """In the forked child: keep only its own pipes, lower the limits, serve."""
    # Out of the way first, so the dup2s below cannot overwrite one another.
    requests, answers = fcntl.fcntl(requests, fcntl.F_DUPFD, 100), fcntl.fcntl(answers, fcntl.F_DUPFD, 100)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # input() in user code gets EOF; fd 0 was the protocol
    os.dup2(capture, 1)  # fd 1 was the protocol too: now plain captured output
    os.dup2(capture, 2)
    os.dup2(requests, 3, inheritable=False)
    os.dup2(answers, 4, inheritable=False)
    os.closerange(5, resource.getrlimit(resource.RLIMIT_NOFILE)[0])  # every supervisor fd
    _prctl(PR_SET_DUMPABLE, 1)
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
    # Line-buffered, like a terminal, and kept open for the REPL's whole life.
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGXCPU, _on_alarm)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the supervisor ignores it
    _set_limits(config, cpu_left)
    Repl(config, 3, 4).serve()


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


# --- the supervisor: owns the protocol and the budgets ------------------------


class Process:
    """One line of /proc/<pid>/stat."""

    def __init__(self, pid: int, fields: list[str]) -> None:
        # fields start after "pid (comm)": state is field 3 of the man page.
        self.pid, self.state, self.ppid = pid, fields[0], int(fields[1])
        ticks = sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
        self.cpu_seconds = ticks / CLOCK_TICKS
        self.rss_bytes = int(fields[21]) * PAGE_BYTES

    def memory_bytes(self) -> int:
        """Proportional set size: pages shared with a fork count once over all
        sharers (a forked child is not charged its parent's whole heap)."""
        try:
            with open(f"/proc/{self.pid}/smaps_rollup", "rb") as reader:
                for line in reader:
                    if line.startswith(b"Pss:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
        return self.rss_bytes


def _processes() -> dict[int, Process]:
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as reader:
                line = reader.read().decode("utf-8", "replace")
        except OSError:
            continue
        found[int(name)] = Process(int(name), line[line.rindex(")") + 2 :].split())
    return found


class Budget(Exception):
    """A call broke a limit the supervisor enforces: the worker is restarted."""


class Supervisor:
    def __init__(self, config: dict[str, int]) -> None:
        self.config = config
        self.pid = os.getpid()
        self.worker = 0
        self.capture = self.requests = self.answers = -1
        self.pending = b""  # bytes of the worker's answer read so far

    # -- processes --

    def descendants(self) -> dict[int, Process]:
        """Every process below the supervisor, zombies included. As PID 1 of
        the sandbox's PID namespace, that is every other process it sees;
        otherwise (no isolation) the tree below it: it is their sub-reaper,
        so orphans stay below it."""
        table = _processes()
        table.pop(self.pid, None)
        if self.pid == 1:
            return table
        children: dict[int, list[int]] = {}
        for process in table.values():
            children.setdefault(process.ppid, []).append(process.pid)
        found, stack = {}, list(children.get(self.pid, []))
        while stack:
            pid = stack.pop()
            if pid in table and pid not in found:
                found[pid] = table[pid]
                stack += children.get(pid, [])
        return found

    def cpu_seconds(self, processes: dict[int, Process] | None = None) -> float:
        """CPU the session has used: live and unreaped processes, plus every
        process already reaped below the supervisor."""
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        live = sum(process.cpu_seconds for process in (processes or self.descendants()).values())
        return live + reaped.ru_utime + reaped.ru_stime

    def reap(self) -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.worker:
                self.worker = 0

    def kill_strays(self, keep_worker: bool = True) -> None:
        """SIGKILL every descendant (but the worker, if asked), until two scans
        in a row find none (one scan can miss a process being reparented)."""
        deadline = time.monotonic() + 5
        clean = 0
        while time.monotonic() < deadline:
            self.reap()
            keep = {self.worker} if keep_worker else set()
            alive = [pid for pid, process in self.descendants().items() if pid not in keep and process.state != "Z"]
            clean = 0 if alive else clean + 1
            if clean == 2:
                return
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if alive:
                time.sleep(0.005)  # let them die before the next scan
        if keep_worker:
            self.kill_strays(keep_worker=False)

    def start_worker(self) -> None:
        self.stop_worker()
        capture_read, capture_write = os.pipe()
        requests_read, requests_write = os.pipe()
        answers_read, answers_write = os.pipe()
        cpu_left = max(1, int(self.config["session_cpu_seconds"] - self.cpu_seconds()) + 1)
        pid = os.fork()
        if pid == 0:
            try:
                _worker_main(self.config, cpu_left, capture_write, requests_read, answers_write)
            except BaseException:
                traceback.print_exc()
            os._exit(1)
        for fd in (capture_write, requests_read, answers_write):
            os.close(fd)
        for fd in (capture_read, requests_write, answers_read):
            os.set_blocking(fd, False)
        self.worker, self.capture, self.requests, self.answers = pid, capture_read, requests_write, answers_read
        self.pending = b""

    def stop_worker(self) -> None:
        self.kill_strays(keep_worker=False)  # the worker and whatever it left behind
        for fd in (self.capture, self.requests, self.answers):
            if fd >= 0:
                os.close(fd)
        self.capture = self.requests = self.answers = -1
        self.worker = 0

    # -- a call --

    def run(self, code: str) -> tuple[dict[str, Any], list[bytes]]:
        config = self.config
        session_cpu = config["session_cpu_seconds"]
        if self.cpu_seconds() >= session_cpu:
            note = f"The session has used its CPU budget of {session_cpu} seconds; start a new thread to run more code."
            return {"logs": "", "total": 0, "error": True, "restarted": False, "notes": [note]}, []
        restarted = not self.worker
        if restarted:
            self.start_worker()
        self.drain(keep=False)  # what background threads printed since the last call
        before = _snapshot()
        started_cpu, started = self.cpu_seconds(), time.monotonic()
        logs, notes = Logs(config["max_output_bytes"]), []
        nonce = os.urandom(8).hex()
        unsent = json.dumps({"code": code, "nonce": nonce}).encode() + b"\n"
        answer: tuple[dict[str, Any], list[bytes]] | None = None
        error = True
        try:
            while answer is None:
                if not self.worker:
                    raise Budget("The Python process crashed and was restarted: variables and imports are gone.")
                readable = [fd for fd in (self.capture, self.answers) if fd >= 0]
                ready, writable, _ = select.select(readable, [self.requests] if unsent else [], [], POLL_SECONDS)
                if unsent and writable:
                    unsent = unsent[os.write(self.requests, unsent) :]
                if self.capture in ready:
                    self.read_capture(logs)
                if self.answers in ready:
                    answer = self.read_answer(nonce)
                self.reap()
                self.check(started, started_cpu)
            header, images = answer
            error = bool(header.get("error"))
            self.kill_strays()
        except Budget as stop:
            notes.append(str(stop))
            images, restarted = [], True
            self.start_worker()  # stops the old one and all its processes first
        self.drain(logs)
        names, files, file_notes = _collect(before, config["max_file_bytes"])
        result = {
            "logs": logs.text(),
            "total": logs.total,
            "error": error,
            "restarted": restarted,
            "notes": notes + file_notes,
            "images": len(images),
            "files": names,
        }
        return result, images + files

    def check(self, started: float, started_cpu: float) -> None:
        """Stop the call at its wall clock, or at a budget of the whole session."""
        config = self.config
        if time.monotonic() - started > config["timeout_seconds"] + KILL_GRACE_SECONDS:
            raise Budget(
                f"Execution timed out after {config['timeout_seconds']} seconds and the session was restarted: "
                "variables and imports are gone, files in /mnt/data remain."
            )
        processes = self.descendants()
        used = sum(process.memory_bytes() for process in processes.values() if process.state != "Z")
        if used > config["session_memory_bytes"]:
            raise Budget(
                f"Execution stopped: the session's processes used more than {config['session_memory_bytes']} bytes "
                "of memory together; the session was restarted (variables and imports are gone)."
            )
        cpu = self.cpu_seconds(processes)
        if cpu - started_cpu > config["cpu_seconds"] + KILL_GRACE_SECONDS or cpu > config["session_cpu_seconds"]:
            raise Budget(
                "Execution stopped: the call's processes exceeded their CPU time limit; "
                "the session was restarted (variables and imports are gone)."
            )
        if len(processes) > config["max_processes"]:
            raise Budget(
                f"Execution stopped: more than {config['max_processes']} processes; the session was restarted."
            )

    def read_capture(self, logs: Logs) -> bool:
        try:
            chunk = os.read(self.capture, 65536)
        except BlockingIOError:
            return False
        if not chunk:  # every writer is gone (the worker died)
            os.close(self.capture)
            self.capture = -1
            return False
        logs.take(chunk)
        return True

    def drain(self, logs: Logs | None = None, keep: bool = True) -> None:
        sink = logs if keep and logs is not None else Logs(0)
        while self.capture >= 0 and self.read_capture(sink):
            pass

    def read_answer(self, nonce: str) -> tuple[dict[str, Any], list[bytes]] | None:
        """The worker's answer, once complete and for this call (stale or
        forged lines of earlier calls are dropped). Malformed: a crash."""
        try:
            chunk = os.read(self.answers, 1 << 20)
        except BlockingIOError:
            return None
        if not chunk:
            raise Budget("The Python process crashed and was restarted: variables and imports are gone.")
        self.pending += chunk
        while b"\n" in self.pending:
            line, _, rest = self.pending.partition(b"\n")
            try:
                header = json.loads(line)
                sizes = [int(size) for size in header["blobs"]]
            except (ValueError, KeyError, TypeError):
                raise Budget("The Python process broke its protocol and was restarted.") from None
            if len(sizes) > MAX_FIGURES or any(not 0 <= size <= MAX_IMAGE_BYTES for size in sizes):
                raise Budget("The Python process broke its protocol and was restarted.")
            if len(rest) < sum(sizes):
                return None
            blobs, offset = [], 0
            for size in sizes:
                blobs.append(rest[offset : offset + size])
                offset += size
            self.pending = rest[offset:]
            if header.get("nonce") == nonce:
                return header, [blob for blob in blobs if blob.startswith(b"\x89PNG\r\n\x1a\n")]
        if len(self.pending) > MAX_HEADER_BYTES:
            raise Budget("The Python process broke its protocol and was restarted.")
        return None

    # -- input files --

    def add_input(self, source: str, name: str) -> dict[str, Any]:
        """Copy a file the server staged into /mnt/data/<name>: written beside
        it and renamed over it, so a link the code left there is replaced,
        never followed."""
        temp = os.path.join(MNT_DATA, f".input-{os.urandom(8).hex()}")
        try:
            with open(source, "rb") as reader:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
                with open(fd, "wb") as writer:
                    while chunk := reader.read(1 << 20):
                        writer.write(chunk)
            os.replace(temp, os.path.join(MNT_DATA, name))
        except OSError as error:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            return {"type": "input", "ok": False, "message": f"{error.strerror or error}"}
        return {"type": "input", "ok": True}

    # -- the protocol --

    def serve(self) -> None:
        send({"type": "ready"})
        buffer = b""
        while True:
            if b"\n" not in buffer:
                # Between calls: whatever a background thread of the worker started does not live on.
                if not select.select([0], [], [], 1.0)[0]:
                    if self.worker:
                        self.kill_strays()
                    continue
                chunk = os.read(0, 1 << 20)
                if not chunk:
                    return  # the server is gone
                buffer += chunk
                continue
            line, _, buffer = buffer.partition(b"\n")
            request = json.loads(line)
            if request["type"] == "run":
                header, blobs = self.run(request["code"])
                send({"type": "result", **header}, blobs)
            elif request["type"] == "input":
                send(self.add_input(request["source"], request["name"]))


class Logs:
    """A call's stdout and stderr: at most ``cap`` bytes kept, all counted."""

    def __init__(self, cap: int) -> None:
        self.cap, self.kept, self.total = cap, bytearray(), 0

    def take(self, chunk: bytes) -> None:
        self.kept += chunk[: max(0, self.cap - len(self.kept))]
        self.total += len(chunk)

    def text(self) -> str:
        return self.kept.decode("utf-8", "replace")


def send(header: dict[str, Any], blobs: list[bytes] | None = None) -> None:
    blobs = blobs or []
    header["blobs"] = [len(blob) for blob in blobs]
    _write_all(1, json.dumps(header).encode() + b"\n")
    for blob in blobs:
        _write_all(1, blob)


Snapshot = dict[str, tuple[int, int, int]]


def _snapshot() -> Snapshot:
    """Regular files at the top of /mnt/data (never following links)."""
    found: Snapshot = {}
    try:
        entries = list(os.scandir(MNT_DATA))
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


def _collect(before: Snapshot, budget: int) -> tuple[list[str], list[bytes], list[str]]:
    """Files the call created or changed, read with O_NOFOLLOW up to their
    real size; ``budget`` bounds all of them together. Returns their names,
    their bytes, and notes for the model about files left out."""
    cap = budget
    changed = sorted(name for name, mark in _snapshot().items() if before.get(name) != mark)
    names, files, notes = [], [], []
    if len(changed) > MAX_OUTPUT_FILES:
        notes.append(f"Only the first {MAX_OUTPUT_FILES} of {len(changed)} new or changed files were returned.")
    for name in changed[:MAX_OUTPUT_FILES]:
        try:
            fd = os.open(os.path.join(MNT_DATA, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        with open(fd, "rb") as reader:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                continue
            stored = info.st_blocks * 512
            if info.st_size > stored + SPARSE_SLACK_BYTES:
                notes.append(
                    f"{name} was not returned: it is a sparse file of {info.st_size} bytes "
                    f"of which only {stored} are stored."
                )
                continue
            if info.st_size > budget:
                notes.append(
                    f"{name} ({info.st_size} bytes) was not returned: "
                    f"the files of one call may total at most {cap} bytes."
                )
                continue
            data = reader.read(info.st_size)  # never past the size it had when measured
        names.append(name)
        files.append(data)
        budget -= len(data)
    return names, files, notes


def main() -> None:
    # Only stdin, stdout and stderr are the server's to give: uvloop's
    # subprocesses ignore close_fds, so whatever the server holds inheritable
    # (the listening socket `serve --workers N` hands each process, what its
    # own launcher left open) arrives here; asyncio's closed them at the spawn.
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    config = json.loads(sys.argv[1])
    try:
        _prctl(PR_SET_DUMPABLE, 0)  # no /proc/<pid>/fd, mem or environ of the supervisor for its children
        _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of the code stay below it, where it can find them
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        # As PID 1, the supervisor gets from inside the sandbox only the signals
        # it handles: Python handles SIGINT, so model code could end it with one.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _prepare_home()
        os.chdir(MNT_DATA)
        supervisor = Supervisor(config)
        supervisor.start_worker()
    except BaseException as exc:
        send({"type": "error", "message": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(1) from None
    with contextlib.suppress(BrokenPipeError):  # the server is gone
        supervisor.serve()
    supervisor.stop_worker()


if __name__ == "__main__":
    main()
