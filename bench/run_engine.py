"""The run engine's own cost, in process: claim and execute offline-model runs
(no HTTP, no API), per run: CPU of this process (event loop and aiosqlite's
threads), transactions, SQL statements (BEGIN included), on SQLite thread hops to
aiosqlite, on PostgreSQL round trips by kind and the backends' CPU (issue 17).

Runs are inserted directly (a thread, a user message, a queued run each),
then claimed ``--clients`` at a time and executed to completion as the
worker does (app.runner.execute.claim_and_start, then run()). PostgreSQL is
the embedded one of bench/runs.py; its backends' CPU is reported apart.
Prints one line per round; asserts nothing. ``--text`` is the user's message:
``"[[delay 1]] hello there"`` has the answer streamed as a provider's is (a
millisecond between deltas), taking the provider path through the executor.
``--worker`` has a real Worker claim and execute them instead (its tasks,
lease renewal, reaper and pruner included). ``--direct`` sends the runs'
model to bench/overhead.py's OpenAI-compatible stub (another process, its CPU
not counted) by a direct route (app/llm/direct.py) instead of the offline
model. Each line also gives the asyncio tasks created per run.

    .venv/bin/python bench/run_engine.py --db sqlite --runs 320 --clients 1,16
    .venv/bin/python bench/run_engine.py --db postgres
    .venv/bin/python bench/run_engine.py --worker --text "[[delay 1]] hello there"
    .venv/bin/python bench/run_engine.py --direct --clients 1,16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiosqlite.core
from sqlalchemy import event

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead
import runs as base

from app import ids, orm
from app.runner import execute
from app.runtime import Runtime
from app.services import runs
from app.settings import Settings
from app.wire.events import Event
from app.worker import Worker

HOPS = [0]
TASKS = [0]  # asyncio tasks created (a task factory counts them)
# PostgreSQL: round trips to the server, by kind (BEGIN, COMMIT, prepare, execute, ...).
ROUND_TRIPS: dict[str, int] = {}
# With BENCH_TRACE=1: every round trip of each round's last 3 runs (connection, kind, SQL).
TRACE: list[str] | None = [] if os.environ.get("BENCH_TRACE") else None


class CountingProtocol:
    """Stands in for an asyncpg connection's protocol and counts the calls
    that wait for the server's answer (each one round trip)."""

    _WAITS = frozenset({"prepare", "bind_execute", "bind_execute_many", "bind", "execute", "query", "close_statement"})

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._protocol, name)
        if name not in self._WAITS:
            return attribute

        def counted(*args: Any, **kwargs: Any) -> Any:
            kind, sql = name, ""
            if name == "query":
                sql = str(args[0] if args else kwargs["query"])
                kind = sql.split()[0].rstrip(";").upper()  # BEGIN, COMMIT, ROLLBACK, ...
            elif name == "prepare":
                sql = str(args[1] if len(args) > 1 else kwargs["query"])
            elif name in ("bind_execute", "execute"):
                sql = str((args[0] if args else kwargs["state"]).query)
                kind = "statement+notify" if "pg_notify" in sql else "statement"
            ROUND_TRIPS[kind] = ROUND_TRIPS.get(kind, 0) + 1
            if TRACE is not None:
                TRACE.append(f"{id(self._protocol):x} {kind:<16} {' '.join(sql.split())[:110]}")
            return attribute(*args, **kwargs)

        return counted


def count_round_trips(engine: Any) -> None:
    def wrap(dbapi_connection: Any, _record: Any) -> None:
        ROUND_TRIPS["connect"] = ROUND_TRIPS.get("connect", 0) + 1  # and its set-up's round trips (not counted)
        driver = dbapi_connection.driver_connection
        driver._protocol = CountingProtocol(driver._protocol)

    event.listen(engine.sync_engine, "connect", wrap)


def count_hops() -> None:
    """Every call aiosqlite hands to its thread goes through Connection._execute."""
    original = aiosqlite.core.Connection._execute

    async def counted(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        HOPS[0] += 1
        return await original(self, fn, *args, **kwargs)

    aiosqlite.core.Connection._execute = counted  # type: ignore[method-assign]


async def make_runs(runtime: Runtime, count: int, text: str = "hello there") -> None:
    async with runtime.transaction() as session:
        seq = ids.next_seq()
        assistant = orm.Assistant(
            id=ids.new_id(ids.ASSISTANT, seq), project_id=orm.DEFAULT_PROJECT_ID, seq=seq,
            created_at=ids.seconds(seq), model="m", tools=[], metadata_={},
        )  # fmt: skip
        session.add(assistant)
        for _ in range(count):
            seq = ids.next_seq()
            thread = orm.Thread(
                id=ids.new_id(ids.THREAD, seq), project_id=orm.DEFAULT_PROJECT_ID, seq=seq,
                created_at=ids.seconds(seq), metadata_={},
            )  # fmt: skip
            session.add(thread)
            await session.flush()
            seq = ids.next_seq()
            session.add(
                orm.Message(
                    id=ids.new_id(ids.MESSAGE, seq), seq=seq, created_at=ids.seconds(seq), thread_id=thread.id,
                    role="user", content=[{"type": "text", "text": {"value": text, "annotations": []}}],
                    status="completed", metadata_={},
                )
            )  # fmt: skip
            seq = ids.next_seq()
            run = orm.Run(
                id=ids.new_id(ids.RUN, seq), seq=seq, created_at=ids.seconds(seq), thread_id=thread.id,
                assistant_id=assistant.id, status="queued", expires_at=ids.seconds(seq) + 600, model="m",
                instructions="", tools=[], metadata_={}, parallel_tool_calls=True,
            )  # fmt: skip
            session.add(run)
            await session.flush()
            # Logged as the API logs a new run, so this process knows where its log goes on.
            wire = runs.to_wire(run)
            created = [Event.of("thread.run.created", wire), Event.of("thread.run.queued", wire)]
            await runtime.run_log.append(session, run.id, created)


async def measure(
    url: str,
    data_dir: Path,
    runs: int,
    clients: list[int],
    rounds: int,
    postmaster: int | None = None,
    text: str = "hello there",
    worker_mode: bool = False,
    llm_config: Path | None = None,
) -> None:
    def counting_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        TASKS[0] += 1
        return asyncio.Task(coro, loop=loop, **kwargs)

    asyncio.get_running_loop().set_task_factory(counting_factory)  # type: ignore[arg-type]
    runtime = await Runtime.start(Settings(data_dir=data_dir, database_url=url, llm_config=llm_config))
    counts = {"transactions": 0, "statements": 0}

    def tally(name: str) -> Any:
        return lambda *_args: counts.__setitem__(name, counts[name] + 1)

    event.listen(runtime.engine.sync_engine, "begin", tally("transactions"))
    event.listen(runtime.engine.sync_engine, "before_cursor_execute", tally("statements"))
    postgres = runtime.engine.dialect.name == "postgresql"
    if postgres:
        await runtime.engine.dispose()  # connections opened from here on are counted
        count_round_trips(runtime.engine)
    owner = "bench:0:engine"
    try:
        for concurrency in clients:
            for number in range(rounds):
                await make_runs(runtime, runs, text)
                counts.update(transactions=0, statements=0)
                flushes = runtime.run_log.flushes
                HOPS[0] = TASKS[0] = 0
                ROUND_TRIPS.clear()
                wall, cpu = time.perf_counter(), time.process_time()
                database_cpu = base.tree_cpu(postmaster) if postmaster else 0.0
                if worker_mode:
                    worker = Worker(runtime, concurrency=concurrency)
                    await worker.run_until_idle(limit_seconds=600)
                    await worker.stop()
                done = runs if worker_mode else 0
                while done < runs:
                    claimed = await execute.claim_and_start(runtime, owner, concurrency, 60.0, {})
                    await asyncio.gather(*(execute.run(execution) for execution in claimed))
                    done += len(claimed)
                await asyncio.sleep(0.2)  # the notifier's and flusher's last rounds
                wall, cpu = time.perf_counter() - wall - 0.2, time.process_time() - cpu
                trips = ""
                if TRACE is not None:
                    print("\n".join(TRACE[-int(3 * sum(ROUND_TRIPS.values()) / runs) :]))
                    TRACE.clear()
                if postmaster:
                    trips += f"; PostgreSQL CPU {(base.tree_cpu(postmaster) - database_cpu) * 1000 / runs:.2f} ms/run"
                if postgres:
                    kinds = ", ".join(f"{kind} {n / runs:.2f}" for kind, n in sorted(ROUND_TRIPS.items()))
                    trips += f"; round trips {sum(ROUND_TRIPS.values()) / runs:.2f} per run ({kinds})"
                print(
                    f"{concurrency:>2} at a time, round {number}: CPU {cpu * 1000 / runs:.2f} ms/run, "
                    f"wall {wall * 1000 / runs:.2f} ms/run, {counts['transactions'] / runs:.2f} transactions, "
                    f"{counts['statements'] / runs:.2f} statements, {HOPS[0] / runs:.1f} hops per run, "
                    f"{TASKS[0] / runs:.2f} tasks per run, "
                    f"{(runtime.run_log.flushes - flushes) / runs:.2f} delta flushes "
                    f"(load average {os.getloadavg()[0]:.1f}){trips}",
                    flush=True,
                )
    finally:
        await runtime.close()


@contextmanager
def database(db: str, scratch: Path) -> Iterator[tuple[str, int | None]]:
    if db == "sqlite":
        yield f"sqlite+aiosqlite:///{scratch / 'bench.db'}", None
        return
    with base.postgres_url(scratch / "pg") as (url, postmaster):
        yield url, postmaster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--runs", type=int, default=320, help="runs per round")
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--text", default="hello there", help="the user's message (offline model cues)")
    parser.add_argument("--worker", action="store_true", help="a real Worker claims and executes")
    parser.add_argument("--direct", action="store_true", help="a direct route to a stub, not the offline model")
    args = parser.parse_args()
    count_hops()
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as name, contextlib.ExitStack() as stack:
        scratch = Path(name)
        (scratch / "pg").mkdir()
        llm_config = None
        if args.direct:
            llm_config = scratch / "routing.json"
            entries = overhead.routing(stack.enter_context(overhead.stub(scratch)), ["direct"])
            llm_config.write_text(json.dumps({"model_list": entries}))
        with database(args.db, scratch) as (url, postmaster):
            asyncio.run(
                measure(
                    url, scratch / "data", args.runs, args.clients, args.rounds, postmaster, args.text,
                    args.worker, llm_config,
                )
            )  # fmt: skip


if __name__ == "__main__":
    main()
