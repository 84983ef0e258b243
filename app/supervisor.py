"""``serve --workers N``: N serving processes, each the whole server (API and
embedded run executor), each accepting connections from a listening socket of
its own on the one port, all bound by this process (issue 17: one Python
process uses one core).

One socket per process (``SO_REUSEPORT``), not one socket that all accept
from: the kernel then spreads new connections over the processes by a hash of
each connection's addresses. On one shared socket every process's event loop
woke for each new connection and the first awake accepted every connection
waiting, so a burst of keep-alive clients connecting together (an SDK's
pool, the bench's 16 clients) mostly landed on one process and left the other
core idle (bench/README.md, branch ``twoproc``: up to 98 % / 2 % of the CPU). A
process that dies takes its socket with it: this process closes its copy, so
new connections go to the others at once (the few that the kernel had queued
on it are reset, and clients retry them), and binds a new one for the
process that replaces it (listening once that process serves). Another
server started later cannot join the port's group: the port is first bound
without ``SO_REUSEPORT`` (preflight.bind: "already in use"), and a plain
bind fails while the group listens. (Two started at the same instant could
both pass that check before either listens: not guarded against.) The
spreading is Linux's: a hash per connection, whichever process is busy;
elsewhere ``SO_REUSEPORT`` may not balance, or not exist.

The supervisor (this process) binds the port, has the routing file checked
and the database migrated once (in a short-lived process, so that it never
holds litellm or alembic), then starts the N processes (``spawn``: fresh
interpreters, no state shared by fork) and watches them:

- a process that dies is started again (its runs' leases lapse and any
  process's reaper resumes them, as after any crash); one that dies within
  ``QUICK_EXIT_SECONDS`` of starting, ``MAX_QUICK_EXITS`` times in a row, stops
  the whole server with exit status 1 (a start-up failure, not a crash);
- SIGTERM or SIGINT (Ctrl-C) is passed on to every process as SIGTERM: each
  shuts down gracefully as a single server does (streams end, in-flight runs
  drain or are released); stragglers are killed after the graceful shutdown, the drain and ``STOP_MARGIN_SECONDS``.

The processes share nothing but the database: runs are claimed with leases,
each process's streams follow any run through the run event log (issue 11),
and SQLite's writers in different processes meet its busy timeout. Each
process sits in its own process group, so a terminal's Ctrl-C reaches them
only through the supervisor, once, and the kernel sends it SIGTERM should the
supervisor die.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from types import FrameType

from app.settings import Settings

log = logging.getLogger("app")

QUICK_EXIT_SECONDS = 10.0
MAX_QUICK_EXITS = 3
# How long the processes get to shut down after SIGTERM, beyond uvicorn's
# graceful shutdown and the worker's drain (settings.worker_drain_seconds).
STOP_MARGIN_SECONDS = 10.0
# A process that died is replaced after this pause (a wake-up by a signal
# ends it), so that one failing again at once does not spin the supervisor.
RESTART_PAUSE_SECONDS = 1.0
_PR_SET_PDEATHSIG = 1
# The listen backlog of each process's socket (uvicorn's default).
BACKLOG = 2048


def listeners(probe: socket.socket, count: int) -> list[socket.socket]:
    """``count`` listening sockets on the address ``probe`` is bound to
    (preflight.bind: its errors say a port is in use), which is closed: one
    for each serving process. Listening at once, before the start-up checks
    and the migration: the group holds the port from then on (a server
    started meanwhile cannot join it), and connections made meanwhile wait
    to be answered once the processes serve (reset should the start fail).
    One process refuses them instead, its socket bound but not listening
    until it serves; a TCP check of either is no readiness check (/readyz is)."""
    host, port = probe.getsockname()[:2]  # the port chosen, were it 0
    probe.close()
    return [port_socket(host, port) for _ in range(count)]


def port_socket(host: str, port: int, *, listen: bool = True) -> socket.socket:
    """A socket in the port's ``SO_REUSEPORT`` group, listening unless
    ``listen`` is False (its process's server listens once it serves: the
    kernel gives a listening member its share of new connections at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, as in preflight.bind: asyncio sets TCP_NODELAY only then.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:  # connections wait here while the process starts
            sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def prepare(settings: Settings) -> None:
    """Run the start-up checks in a spawned process and wait for them; their
    StartupError is raised here. The process dies with this one, as
    migrate()'s child does (the checks migrate the database)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        pool.submit(_checks, settings, os.getpid()).result()


def _checks(settings: Settings, parent: int) -> None:
    _die_with(parent)
    from app import __main__ as cli  # the CLI module imports this one

    cli.configure_logging(settings)
    cli.preflight_checks(settings)


_MIGRATE_HERE = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); from app import supervisor; "
    "supervisor.migrate_here(int(sys.argv[2]))"
)


def migrate(settings: Settings) -> None:
    """Migrate the database in a child process and wait for it; its
    StartupError is raised here. For a single serving process: alembic,
    imported for a migration only, would otherwise stay resident for the
    process's life (about 9 MiB of the idle server on a new database, issue 17).
    A plain child interpreter, not multiprocessing's spawn: that would leave
    its resource tracker process beside the server for good (10+ MiB more).
    Costs a fresh interpreter's start (0.5-1.5 s) when the schema is behind.
    The child dies with this process (migrate_here): a server killed while it
    migrates leaves no migration running on alone, against a database its
    next start (or the operator) may already be working on."""
    from app.preflight import StartupError

    # The parent's import path, not the child's own: with -c, Python would put
    # the working directory first, where a user's project may have an app.py
    # or app/ of its own (a console script's path does not start there).
    done = subprocess.run(  # noqa: S603 (this interpreter, our program, our own import path)
        [sys.executable, "-c", _MIGRATE_HERE, json.dumps(sys.path), str(os.getpid())],
        input=pickle.dumps(settings),
        stdout=subprocess.PIPE,  # the StartupError's line; logs go to stderr as here
        check=False,
    )
    if done.returncode != 0:
        said = done.stdout.decode(errors="replace").strip()
        raise StartupError(said or f"the database migration's process exited with status {done.returncode}")


def migrate_here(parent: int) -> None:
    """migrate()'s child: the Settings pickled on stdin; a StartupError's line
    on stdout, exit status 1. Ended (SIGTERM) should ``parent``, the server, die first."""
    _die_with(parent)
    from app import __main__ as cli
    from app import preflight

    # stdout carries the error's line alone: whatever else writes there (a
    # library's print) goes to stderr, with the logs.
    result = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    settings: Settings = pickle.load(sys.stdin.buffer)  # noqa: S301 (written by the server that started us)
    cli.configure_logging(settings)
    try:
        preflight.prepare_database(settings)
    except preflight.StartupError as exc:
        result.write(str(exc))
        result.flush()
        raise SystemExit(1) from None


def _die_with(parent: int) -> None:
    """SIGTERM to this process when ``parent`` ends (Linux; elsewhere
    nothing); gone already, before that was asked for, this process
    leaves at once (its parent is then another)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        raise SystemExit(1)


def serve_process(settings: Settings, listener: socket.socket, index: int, count: int) -> None:
    """One serving process (the spawned child's entry point). Its
    code_interpreter sessions take uids no other process on the machine
    holds (app/sandbox/uid_ranges.py)."""
    os.setpgid(0, 0)  # out of the terminal's process group: Ctrl-C reaches the supervisor only
    with contextlib.suppress(OSError, AttributeError):  # Linux: SIGTERM when the supervisor dies
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    # Imported here: the CLI module imports this one.
    from app import __main__ as cli

    cli.configure_logging(settings)
    status = cli.serve(
        settings, listener=listener, prepared=True, name=f"process {index + 1}/{count}, pid {os.getpid()}"
    )
    raise SystemExit(status)


@dataclass
class _Child:
    index: int
    process: BaseProcess
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    def __init__(self, settings: Settings, sockets: list[socket.socket]) -> None:
        """One serving process for each of ``sockets`` (listeners())."""
        self.settings, self.count = settings, len(sockets)
        self.sockets = dict(enumerate(sockets))
        self.context = multiprocessing.get_context("spawn")
        self.children: dict[int, _Child] = {}
        self.stopping = False
        self.quick_exits = 0
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)

    def run(self) -> int:
        previous = {signum: signal.signal(signum, self._on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            for index in range(self.count):
                self._start(index)
            log.info("serving with %d processes (pids %s)", self.count, ", ".join(self._pids()))
            failed = self._watch()
        finally:
            self._stop_all()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._wake_read.close()
            self._wake_write.close()
            for sock in self.sockets.values():
                sock.close()
        return 1 if failed else 0

    def _pids(self) -> list[str]:
        return [str(child.process.pid) for child in self.children.values()]

    def _start(self, index: int) -> None:
        process = self.context.Process(
            target=serve_process,
            args=(self.settings, self.sockets[index], index, self.count),
            name=f"assistants-server-{index + 1}",
        )
        process.start()
        self.children[index] = _Child(index, process)

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self.stopping = True
        with contextlib.suppress(OSError):
            self._wake_write.send(b"x")

    def _watch(self) -> bool:
        """Restart processes that die until a signal; True if they keep failing at start-up."""
        while not self.stopping:
            sentinels = {child.process.sentinel: child for child in self.children.values()}
            ready = multiprocessing.connection.wait([*sentinels, self._wake_read])
            for item in ready:
                child = sentinels.get(item) if isinstance(item, int) else None
                if child is None or self.stopping:
                    continue
                child.process.join()
                lived = time.monotonic() - child.started
                log.error(
                    "serving process %d (pid %s) exited with status %s after %.1f s; starting another",
                    child.index + 1,
                    child.process.pid,
                    child.process.exitcode,
                    lived,
                )
                self.quick_exits = self.quick_exits + 1 if lived < QUICK_EXIT_SECONDS else 0
                if self.quick_exits >= MAX_QUICK_EXITS:
                    log.error("serving processes keep exiting at start-up: stopping the server")
                    return True
                if not self._restart(child.index):
                    return True
        return False

    def _restart(self, index: int) -> bool:
        """The dead process's socket closed (its connections go to the others
        now), then, after a pause, a process on a new one; False if the port
        cannot be listened on again."""
        dead = self.sockets[index]
        host, port = dead.getsockname()[:2]
        dead.close()
        multiprocessing.connection.wait([self._wake_read], timeout=RESTART_PAUSE_SECONDS)
        if self.stopping:  # a signal during the pause
            self.sockets.pop(index)
            return True
        try:
            # Not listening yet: the kernel would queue a share of new
            # connections on it through the pause and the new process's
            # start (seconds), and reset them should that start fail; the
            # others take them all until the new process serves.
            self.sockets[index] = port_socket(host, port, listen=False)
        except OSError as error:
            self.sockets.pop(index)
            log.error("cannot listen on %s:%s again for a new process (%s): stopping the server", host, port, error)
            return False
        self._start(index)
        return True

    def _stop_all(self) -> None:
        # The processes hold their own copies of the sockets: with these
        # closed, the port refuses new connections once the processes stop
        # listening (their graceful shutdown), as one process's does, rather
        # than queue them here for nobody until the processes are gone.
        for sock in self.sockets.values():
            sock.close()
        alive = [child.process for child in self.children.values() if child.process.is_alive()]
        for process in alive:
            if process.pid:  # never 0: that would signal this whole process group
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        from app.__main__ import GRACEFUL_SHUTDOWN_SECONDS  # the CLI module imports this one

        stop_seconds = GRACEFUL_SHUTDOWN_SECONDS + self.settings.worker_drain_seconds + STOP_MARGIN_SECONDS
        deadline = time.monotonic() + stop_seconds
        for process in alive:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("serving process pid %s did not stop in %.0f s: killed", process.pid, stop_seconds)
                process.kill()
                process.join()
