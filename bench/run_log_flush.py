"""What one flush of the run log costs (issue 17): the process's CPU and the
wall time of ``RunLog.flush()`` writing a few deltas of one live run, over
and over, with no HTTP, no model and no worker around it.

    .venv/bin/python bench/run_log_flush.py                       # SQLite file, 5 rounds of 1,000 flushes
    .venv/bin/python bench/run_log_flush.py --deltas 1 --flushes 500
    .venv/bin/python bench/run_log_flush.py --postgres                # an embedded PostgreSQL of its own
    .venv/bin/python bench/run_log_flush.py --database-url postgresql+asyncpg://...

While a model streams, the flusher writes every ``run_events_flush_seconds``
(20 ms), so at a model's pace its cost follows the run's duration: this
sizes that cost alone. To compare two trees, run this file of each in turn
(CPU is the whole process's, aiosqlite's thread included: time.process_time).
With ``--postgres`` it starts an embedded PostgreSQL (bench/runs.py's, a
database of its own, migrated by this tree) and prints that server's CPU a
flush too: its processes' user and system time, from /proc.
Not a test: it prints numbers, asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import runs as base  # noqa: E402
from sqlalchemy import update  # noqa: E402

from app import orm  # noqa: E402
from app.runtime import Runtime  # noqa: E402
from app.services import assistants, projects, runs  # noqa: E402
from app.settings import Settings  # noqa: E402
from app.wire.assistants import AssistantCreate  # noqa: E402
from app.wire.events import Event  # noqa: E402
from app.wire.runs import ThreadAndRunCreate  # noqa: E402


async def _live_run(runtime: Runtime) -> str:
    """A run created as a client creates one, then marked in progress (its
    deltas are logged; no worker executes it)."""
    async with runtime.transaction() as session:
        assistant = await assistants.create(session, projects.DEFAULT, AssistantCreate(model="gpt-4o"))
    async with runtime.transaction() as session:
        body = ThreadAndRunCreate.model_validate(
            {"assistant_id": assistant.id, "thread": {"messages": [{"role": "user", "content": "hi"}]}}
        )
        _thread, run, _events = await runs.create_thread_and_run(session, projects.DEFAULT, body, expires_in=3600)
    async with runtime.transaction() as session:
        await session.execute(update(orm.Run).where(orm.Run.id == run.id).values(status="in_progress"))
    return run.id


def _delta(message_id: str) -> Event:
    text = {"index": 0, "type": "text", "text": {"value": " word"}}
    return Event(
        "thread.message.delta", {"id": message_id, "object": "thread.message.delta", "delta": {"content": [text]}}
    )


def _server_cpu(postmaster: int | None) -> float:
    """CPU seconds so far of the PostgreSQL server whose postmaster is
    ``postmaster`` (it and its children: the backends, which live as long
    as the pool's connections); 0 without one."""
    if postmaster is None:
        return 0.0
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent, cpu = base.process_cpu(int(entry.name))
            if int(entry.name) == postmaster or parent == postmaster:
                total += cpu
    return total


async def measure(args: argparse.Namespace, url: str, postmaster: int | None) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="flush-bench-"))
    url = url or f"sqlite+aiosqlite:///{scratch / 'db.sqlite'}"
    settings = Settings(
        data_dir=scratch,
        database_url=url,
        embedded_worker=False,
        record_model_requests=False,
        run_events_flush_seconds=3600,  # the flusher sleeps: every flush is this loop's
    )
    runtime = await Runtime.start(settings)
    try:
        run_id = await _live_run(runtime)
        deltas = [_delta("msg_bench") for _ in range(args.deltas)]
        log = runtime.run_log
        cpu_us: list[float] = []
        wall_us: list[float] = []
        server_us: list[float] = []
        for _round in range(args.rounds):
            cpu, wall, server = time.process_time(), time.perf_counter(), _server_cpu(postmaster)
            for _flush in range(args.flushes):
                log.publish(run_id, deltas)
                await log.flush()
            cpu_us.append((time.process_time() - cpu) / args.flushes * 1e6)
            wall_us.append((time.perf_counter() - wall) / args.flushes * 1e6)
            server_us.append((_server_cpu(postmaster) - server) / args.flushes * 1e6)
        load = " ".join(f"{value:.2f}" for value in os.getloadavg())
        what = f"{args.rounds} rounds of {args.flushes} flushes of {args.deltas} deltas"
        print(f"{ROOT}: {what} ({url.split(':')[0]}; load {load})")
        print(f"  CPU µs a flush:  {' '.join(f'{v:.0f}' for v in cpu_us)}  median {statistics.median(cpu_us):.0f}")
        print(f"  wall µs a flush: {' '.join(f'{v:.0f}' for v in wall_us)}  median {statistics.median(wall_us):.0f}")
        if postmaster is not None:
            print(
                f"  PostgreSQL's CPU µs a flush: {' '.join(f'{v:.0f}' for v in server_us)}"
                f"  median {statistics.median(server_us):.0f}"
            )
    finally:
        await runtime.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default="", help="default: a SQLite file in a scratch directory")
    parser.add_argument("--deltas", type=int, default=5, help="deltas buffered before each flush")
    parser.add_argument("--flushes", type=int, default=1000, help="flushes a round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--postgres", action="store_true", help="an embedded PostgreSQL of its own, its CPU too")
    args = parser.parse_args()
    if not args.postgres:
        asyncio.run(measure(args, args.database_url, None))
        return
    with tempfile.TemporaryDirectory(prefix="flush-bench-pg-") as root, base.postgres_url(Path(root)) as found:
        url, postmaster = found
        asyncio.run(measure(args, url, postmaster))


if __name__ == "__main__":
    main()
