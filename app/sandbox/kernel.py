"""The in-sandbox side of a code_interpreter session: a persistent Python REPL.

This file runs *inside* the sandbox under the sandbox's own Python, so it
imports nothing from the server. It is deliberately small instead of a
Jupyter kernel: a kernel talks over ZeroMQ sockets, which a private network
namespace cannot share with the host, while this speaks JSON lines over the
pipes the server already holds.

Protocol: the server writes one JSON request per line on stdin
(``{"code": ...}``); the REPL answers on the pipe that was its stdout with
``{"type": "ready"}`` once, then one ``{"type": "result", ...}`` per request.
File descriptors 1 and 2 are re-pointed at a capture pipe before any user code
runs, so prints, tracebacks, C extensions and child processes all land in the
logs, and user code cannot corrupt the protocol by printing.
"""

from __future__ import annotations

import base64
import io
import json
import os
import resource
import signal
import sys
import threading
import traceback
from types import FrameType
from typing import Any

MNT_DATA = os.environ.get("SANDBOX_MNT_DATA", "/mnt/data")
# How long the REPL waits for the end of a call's output once its code returned
# (only code that closed or re-pointed fd 1 makes this wait run out).
DRAIN_SECONDS = 5.0
# Figures returned per call; the rest are closed unseen.
MAX_FIGURES = 10


class CallTimeout(BaseException):
    """Raised in user code when its wall-clock or CPU budget runs out.

    A BaseException, so a bare ``except Exception`` in model code does not
    swallow it."""


class Capture:
    """Drains the capture pipe in a thread, keeping at most ``cap`` bytes per call.

    The end of a call's output is found by a random marker the REPL writes to
    fd 1 after the code returns: pipe writes are ordered, so everything the
    REPL's own process printed before it is already in the pipe."""

    def __init__(self, read_fd: int, cap: int, marker: bytes) -> None:
        self.read_fd, self.cap, self.marker = read_fd, cap, marker
        self.kept = bytearray()
        self.total = 0
        self.tail = b""
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.finished: tuple[bytes, int] = (b"", 0)

    def run(self) -> None:
        while chunk := os.read(self.read_fd, 65536):
            with self.lock:
                self._take(chunk)

    def _take(self, chunk: bytes) -> None:
        window = self.tail + chunk
        start = self.total - len(self.tail)  # offset of window[0] in this call's stream
        self.kept += chunk[: max(0, self.cap - len(self.kept))]
        self.total += len(chunk)
        self.tail = window[-len(self.marker) :]
        found = window.find(self.marker)
        if found == -1:
            return
        end = start + found
        del self.kept[end:]
        self.finished = (bytes(self.kept), end)
        self.done.set()
        rest = window[found + len(self.marker) :]
        self.kept, self.total, self.tail = bytearray(rest[: self.cap]), len(rest), b""

    def collect(self) -> tuple[bytes, int]:
        """Wait for the marker; (kept bytes, total bytes written) of the call."""
        if not self.done.wait(DRAIN_SECONDS):
            with self.lock:
                kept, total = bytes(self.kept), self.total
                self.kept, self.total, self.tail = bytearray(), 0, b""
                return kept, total
        with self.lock:
            self.done.clear()
            return self.finished


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    reason = "CPU time limit" if signum == signal.SIGXCPU else "time limit"
    raise CallTimeout(f"Execution stopped: the call exceeded its {reason}.")


def _set_limits(config: dict[str, int]) -> None:
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
    cpu = config["session_cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))


def _cpu_used() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return int(usage.ru_utime + usage.ru_stime) + 1


def _figures() -> list[str]:
    """Every open matplotlib figure as base64 PNG, then closed (plt.show() and savefig alike)."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return []
    images = []
    for number in pyplot.get_fignums()[:MAX_FIGURES]:
        buffer = io.BytesIO()
        pyplot.figure(number).savefig(buffer, format="png")
        images.append(base64.b64encode(buffer.getvalue()).decode())
    pyplot.close("all")
    return images


class Repl:
    def __init__(self, config: dict[str, int], protocol: Any, capture: Capture) -> None:
        self.config, self.protocol, self.capture = config, protocol, capture
        self.namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
        self.stdout, self.stderr = sys.stdout, sys.stderr
        self.pid = os.getpid()

    def send(self, message: dict[str, Any]) -> None:
        self.protocol.write(json.dumps(message) + "\n")
        self.protocol.flush()

    def execute(self, code: str) -> dict[str, Any]:
        error = False
        sys.stdout, sys.stderr = self.stdout, self.stderr  # undo redirections of the previous cell
        soft_cpu = min(_cpu_used() + self.config["cpu_seconds"], self.config["session_cpu_seconds"])
        resource.setrlimit(resource.RLIMIT_CPU, (soft_cpu, self.config["session_cpu_seconds"]))
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
        os.write(1, self.capture.marker)
        logs, total = self.capture.collect()
        return {
            "type": "result",
            "logs": logs.decode("utf-8", "replace"),
            "total": total,
            "error": error,
            "images": images,
        }

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

    def _images(self) -> list[str]:
        signal.alarm(self.config["timeout_seconds"])  # a pathological figure must not hang the call
        try:
            return _figures()
        except BaseException:
            self._report(sys.exc_info())
            return []
        finally:
            signal.alarm(0)

    def serve(self, requests: Any) -> None:
        self.send({"type": "ready"})
        for line in requests:
            request = json.loads(line)
            self.send(self.execute(request["code"]))


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


def main() -> None:
    config = json.loads(sys.argv[1])
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # input() in user code gets EOF, not the protocol
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    for fd in (protocol.fileno(), requests.fileno(), read_fd):
        os.set_inheritable(fd, False)
    # Line-buffered, like a terminal, and kept open for the REPL's whole life.
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    capture = Capture(read_fd, config["max_output_bytes"], os.urandom(16).hex().encode() + b"\n")
    threading.Thread(target=capture.run, daemon=True).start()
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.signal(signal.SIGXCPU, _on_alarm)
    try:
        _prepare_home()
        os.chdir(MNT_DATA)
        _set_limits(config)
    except BaseException as exc:  # stderr is the capture pipe by now: tell the server directly
        protocol.write(json.dumps({"type": "error", "message": f"{type(exc).__name__}: {exc}"}) + "\n")
        protocol.flush()
        raise SystemExit(1) from None
    Repl(config, protocol, capture).serve(requests)


if __name__ == "__main__":
    main()
