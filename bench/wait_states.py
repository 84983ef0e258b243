"""Where a run's wall time goes under concurrent clients on PostgreSQL (issue 17).

Starts an embedded PostgreSQL and the real server (``python -m app serve``,
offline model), drives N clients (streaming or polling as the SDK does, the
clients of bench/overhead.py) and, over the measured window, reads what each
side was doing from the kernel and from PostgreSQL instead of timing code:

- the server's threads (its event loop: the busiest one), from
  ``/proc/PID/task/*/schedstat`` and ``status``: time running on a core,
  time runnable but waiting for a core (another process had it), the rest
  asleep in the loop (waiting on I/O or timers); and the context switches:
  voluntary (the loop went to sleep) and not (it was preempted);
- PostgreSQL's backends (the postmaster's children), the same two times;
- every client backend's state and wait event, sampled every
  ``--sample-ms`` from a connection of this process (``pg_stat_activity``):
  running, waiting for the server (``idle in transaction``: a transaction
  open while the server does something else), lock waits, WAL flushes;
- the WAL fsyncs of the window and their mean time (``pg_stat_io``,
  ``track_wal_io_timing`` turned on for the embedded server);
- the clients' mean latency against Little's law (clients / runs per second):
  equal when the clients spend no wall outside their requests; and this
  process's loop (the clients and the sampler), running and runnable.

Everything is per run: milliseconds of the window divided by the runs
completed in it. Linux only (``/proc``).

    .venv/bin/python bench/wait_states.py --clients 16 --modes stream,poll
    .venv/bin/python bench/wait_states.py --env ASSISTANTS_WORKERS=2
    .venv/bin/python bench/wait_states.py --pin 0:1   # the server on CPU 0, PostgreSQL on CPU 1
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead
import runs as base


@dataclass
class Scheduled:
    """Nanoseconds on a core and waiting for one; context switches."""

    running: int = 0
    waiting: int = 0
    voluntary: int = 0
    preempted: int = 0

    def __sub__(self, other: Scheduled) -> Scheduled:
        return Scheduled(
            self.running - other.running,
            self.waiting - other.waiting,
            self.voluntary - other.voluntary,
            self.preempted - other.preempted,
        )


def _task(path: Path) -> Scheduled:
    running, waiting, _ = (path / "schedstat").read_text().split()
    switches = {}
    for line in (path / "status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
            switches[name] = int(value)
    return Scheduled(
        int(running), int(waiting), switches["voluntary_ctxt_switches"], switches["nonvoluntary_ctxt_switches"]
    )


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def pin(pids: list[int], cpus: set[int]) -> None:
    """Every thread of ``pids`` onto ``cpus`` (new children and threads inherit it)."""
    for pid in pids:
        with_tasks = Path(f"/proc/{pid}/task")
        for task in with_tasks.iterdir() if with_tasks.exists() else ():
            with contextlib.suppress(OSError):  # ended meanwhile
                os.sched_setaffinity(int(task.name), cpus)


def cpu_set(text: str) -> set[int]:
    return {int(cpu) for cpu in text.split(",")} if text else set(range(os.cpu_count() or 1))


def threads(pids: list[int]) -> dict[str, Scheduled]:
    """Each thread of ``pids`` (the server and its serving processes)."""
    seen = {}
    for pid in pids:
        with_tasks = Path(f"/proc/{pid}/task")
        for task in with_tasks.iterdir() if with_tasks.exists() else ():
            try:
                seen[f"{pid}/{task.name}"] = _task(task)
            except (OSError, KeyError):
                continue  # ended meanwhile
    return seen


def processes(pids: list[int]) -> Scheduled:
    """``pids`` summed (PostgreSQL's backends: one process each)."""
    total = Scheduled()
    for pid in pids:
        try:
            one = _task(Path(f"/proc/{pid}"))
        except (OSError, KeyError):
            continue
        total = Scheduled(
            total.running + one.running,
            total.waiting + one.waiting,
            total.voluntary + one.voluntary,
            total.preempted + one.preempted,
        )
    return total


@dataclass
class Activity:
    """pg_stat_activity of the bench database's client backends, sampled."""

    samples: int = 0
    states: collections.Counter[str] = field(default_factory=collections.Counter)
    statements: collections.Counter[str] = field(default_factory=collections.Counter)


ACTIVITY = """
SELECT state, coalesce(wait_event_type, '-') || ':' || coalesce(wait_event, '-'), left(query, 36)
FROM pg_stat_activity WHERE backend_type = 'client backend' AND datname = 'bench' AND pid <> pg_backend_pid()
"""
WAL_IO = "SELECT sum(fsyncs)::float8, sum(fsync_time)::float8 FROM pg_stat_io WHERE object = 'wal'"


async def sample_activity(connection: Any, stop: float, every: float, into: Activity) -> None:
    statement = await connection.prepare(ACTIVITY)
    while time.monotonic() < stop:
        into.samples += 1
        for state, wait, query in await statement.fetch():
            if state == "idle":
                continue
            into.states[f"{state} ({wait})"] += 1
            into.statements[f"{state} ({wait}): {' '.join(query.split())}"] += 1
        await asyncio.sleep(every)


@dataclass
class Window:
    runs: int
    seconds: float
    latencies: list[float]
    loop: Scheduled
    other_threads: Scheduled
    serving_loops: int
    database: Scheduled
    client: Scheduled
    activity: Activity
    wal_fsyncs: float
    wal_fsync_ms: float


async def measure(
    port: int, server_pid: int, postmaster: int, socket_dir: str, args: argparse.Namespace, mode: str
) -> Window:
    import asyncpg  # type: ignore[import-untyped]

    client = overhead.Client("127.0.0.1", port)
    _, data = await client.call("POST", "/v1/assistants", {"model": "offline-bench", "instructions": "Be brief."})
    await client.close()
    assistant = json.loads(data)["id"]
    once = overhead.stream_once if mode == "stream" else overhead.poll_once
    begin = time.monotonic()
    window, stop = begin + args.warmup, begin + args.warmup + args.duration
    done: list[overhead.Sample] = []

    async def client_loop() -> None:
        mine = overhead.Client("127.0.0.1", port)
        try:
            while time.monotonic() < stop:
                done.append(await once(mine, assistant, "offline-bench", "Say hello."))
        finally:
            await mine.close()

    clients = [asyncio.create_task(client_loop()) for _ in range(args.clients)]
    connection = await asyncpg.connect(user="postgres", database="bench", host=socket_dir)
    try:
        await asyncio.sleep(max(0.0, window - time.monotonic()))
        served = [server_pid, *children(server_pid)]
        sampler = await connection.fetchval("SELECT pg_backend_pid()")
        backends = [pid for pid in children(postmaster) if pid != sampler]  # not the sampler's own
        threads_before, database_before = threads(served), processes(backends)
        client_before = _task(Path(f"/proc/self/task/{threading.get_native_id()}"))
        wal_before = await connection.fetchrow(WAL_IO)
        started = time.monotonic()
        activity = Activity()
        await sample_activity(connection, stop, args.sample_ms / 1000, activity)
        seconds = time.monotonic() - started
        threads_after, database_after = threads(served), processes(backends)
        client_after = _task(Path(f"/proc/self/task/{threading.get_native_id()}"))
        wal_after = await connection.fetchrow(WAL_IO)
        await asyncio.gather(*clients)
    finally:
        await connection.close()
    # The runs that ended in the window, as the CPU read over it.
    ended = [sample for sample in done if started <= sample.done_at <= started + seconds]
    spent = {name: threads_after[name] - threads_before[name] for name in threads_after if name in threads_before}
    # The event loops: in each serving process its busiest thread (a
    # supervisor of `serve --workers N`, which serves nothing, left out).
    loops: dict[str, Scheduled] = {}
    for name, used in spent.items():
        pid = name.split("/")[0]
        if pid not in loops or used.running > loops[pid].running:
            loops[pid] = used
    serving = {pid: used for pid, used in loops.items() if used.running > seconds * 1e9 * 0.01}
    loop = Scheduled()
    for used in serving.values():
        loop = Scheduled(
            loop.running + used.running,
            loop.waiting + used.waiting,
            loop.voluntary + used.voluntary,
            loop.preempted + used.preempted,
        )
    everything = sum((used.running for used in spent.values()), 0)
    fsyncs = (wal_after[0] or 0) - (wal_before[0] or 0)
    fsync_ms = ((wal_after[1] or 0) - (wal_before[1] or 0)) / fsyncs if fsyncs else float("nan")
    return Window(
        runs=len(ended),
        seconds=seconds,
        latencies=[sample.seconds for sample in ended],
        loop=loop,
        other_threads=Scheduled(running=everything - loop.running),
        serving_loops=len(serving),
        database=database_after - database_before,
        client=client_after - client_before,
        activity=activity,
        wal_fsyncs=fsyncs,
        wal_fsync_ms=fsync_ms,
    )


def report(mode: str, result: Window, clients: int, top: int, pinned: str) -> list[str]:
    runs = max(result.runs, 1)
    rate = result.runs / result.seconds
    mean = sum(result.latencies) / runs
    wall_ms = result.seconds * 1000 * result.serving_loops / runs  # the loops' wall per run

    def per_run(nanoseconds: int) -> str:
        return f"{nanoseconds / 1e6 / runs:.2f}"

    loop = result.loop
    asleep = wall_ms - (loop.running + loop.waiting) / 1e6 / runs
    lines = [
        f"\n#### {mode}, {clients} clients, {result.serving_loops} serving process(es), "
        f"pinned {pinned or 'no'}, load average {os.getloadavg()[0]:.1f}\n",
        f"{result.runs} runs in {result.seconds:.1f} s: **{rate:.0f} runs/s**; mean latency {mean * 1000:.1f} ms, "
        f"clients / runs per second {clients / rate * 1000:.1f} ms (Little's law; equal: no wall outside requests)\n",
        "| per run | ms |",
        "|---|---:|",
        f"| server event loop(s): wall | {wall_ms:.2f} |",
        f"| ... running on a core | {per_run(loop.running)} |",
        f"| ... runnable, waiting for a core | {per_run(loop.waiting)} |",
        f"| ... asleep (waiting on I/O, timers) | {asleep:.2f} |",
        f"| server's other threads, running | {per_run(result.other_threads.running)} |",
        f"| PostgreSQL backends, running | {per_run(result.database.running)} |",
        f"| PostgreSQL backends, runnable, waiting for a core | {per_run(result.database.waiting)} |",
        f"| the bench's loop (its clients and the sampler): running / runnable | {per_run(result.client.running)} / "
        f"{per_run(result.client.waiting)} |",
        f"| PostgreSQL backends, went to sleep (≈ statements and commits received) | "
        f"{result.database.voluntary / runs:.2f} times |",
        f"| WAL fsyncs per run, mean fsync | {result.wal_fsyncs / runs:.2f}, {result.wal_fsync_ms:.3f} ms |",
        "",
        f"Loop context switches per run: {loop.voluntary / runs:.2f} asleep, {loop.preempted / runs:.2f} preempted.",
        "",
        f"PostgreSQL client backends not idle, mean number at a sample ({result.activity.samples} samples):",
    ]
    samples = max(result.activity.samples, 1)
    lines += [f"- {count / samples:.3f} {state}" for state, count in result.activity.states.most_common(top)]
    lines += ["", "By statement:"]
    lines += [f"- {count / samples:.3f} {what}" for what, count in result.activity.statements.most_common(top)]
    return lines


def _modes(text: str) -> list[str]:
    """--modes' value: only the modes this bench measures (any other was run as ``poll``)."""
    modes = text.split(",")
    unknown = [mode for mode in modes if mode not in ("stream", "poll")]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {', '.join(unknown)}: stream, poll")
    return modes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--modes",
        default="stream,poll",
        type=_modes,
        help="stream, poll or both, comma-separated",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per mode")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the window")
    parser.add_argument("--sample-ms", type=float, default=2.0, help="pg_stat_activity sampling interval")
    parser.add_argument("--top", type=int, default=8, help="states and statements listed")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server")
    parser.add_argument(
        "--pin",
        default="",
        metavar="SERVER:DATABASE",
        help="CPUs for the server and for PostgreSQL, e.g. 0:1 (comma-separated lists; empty: any): "
        "whether the loop loses its core to the backends its statements wake",
    )
    args = parser.parse_args(argv)
    extra_env = dict(item.split("=", 1) for item in args.env)
    lines = []
    with tempfile.TemporaryDirectory(prefix="wait-states-") as scratch_dir:
        scratch = Path(scratch_dir)
        (scratch / "pg").mkdir()
        with base.postgres_url(scratch / "pg") as (url, postmaster):
            socket_dir = url.split("host=", 1)[1]
            asyncio.run(_wal_timing(socket_dir))
            server_cpus, _, database_cpus = args.pin.partition(":")
            if args.pin:
                pin([postmaster, *children(postmaster)], cpu_set(database_cpus))
            for mode in args.modes:
                with overhead.server(url, scratch, None, extra_env) as (port, pid):
                    if args.pin:
                        pin([pid, *children(pid)], cpu_set(server_cpus))
                    result = asyncio.run(measure(port, pid, postmaster, socket_dir, args, mode))
                lines += report(mode, result, args.clients, args.top, args.pin)
    print("\n".join(lines))
    return 0


async def _wal_timing(socket_dir: str) -> None:
    """WAL fsync times in pg_stat_io (the embedded server is the bench's own)."""
    import asyncpg

    connection = await asyncpg.connect(user="postgres", database="postgres", host=socket_dir)
    try:
        await connection.execute("ALTER SYSTEM SET track_wal_io_timing = on")
        await connection.execute("SELECT pg_reload_conf()")
    finally:
        await connection.close()


if __name__ == "__main__":
    sys.exit(main())
