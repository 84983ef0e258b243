"""What a NOTIFY costs PostgreSQL per listening connection (issue 17).

An embedded PostgreSQL; one connection sends ``--notifies`` autocommitted
``SELECT pg_notify('run_events', ...)`` ``--gap-ms`` apart (a handed run's
commit sends one) while ``--listeners`` other connections LISTEN, the first
on that channel (its notifications read by this process, as the server's
run log reads its own), the others on another channel (as the worker's
wake-ups listened on a connection of their own before `pglat`). Prints, per
NOTIFY, PostgreSQL's CPU (the postmaster's tree, from /proc) and the
sender's round trip (p50); rounds alternate the listener counts given.

    .venv/bin/python bench/pg_listeners.py --listeners 1,2 --rounds 4 --notifies 2000 --gap-ms 1
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runs as base


async def _round(dsn: str, listeners: int, notifies: int, postmaster: int, gap: float) -> tuple[float, float, int]:
    import asyncpg  # type: ignore[import-untyped]

    heard = 0

    def on_notify(*_args: object) -> None:
        nonlocal heard
        heard += 1

    opened = [await asyncpg.connect(dsn) for _ in range(listeners)]
    sender = await asyncpg.connect(dsn)
    try:
        for index, connection in enumerate(opened):
            await connection.add_listener("run_events" if index == 0 else "work", on_notify)
        for _ in range(200):  # warm-up
            await sender.execute("SELECT pg_notify('run_events', 'run_x elsewhere')")
        await asyncio.sleep(0.2)
        heard = 0
        before = base.tree_cpu(postmaster)
        trips = []
        for _ in range(notifies):
            started = time.perf_counter()
            await sender.execute("SELECT pg_notify('run_events', 'run_x elsewhere')")
            trips.append(time.perf_counter() - started)
            if gap:
                await asyncio.sleep(gap)  # (each NOTIFY a wake of its own, as a run's is)
        await asyncio.sleep(0.2)
        cpu = base.tree_cpu(postmaster) - before
        return cpu / notifies * 1000, statistics.median(trips) * 1000, heard
    finally:
        for connection in [*opened, sender]:
            await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listeners", default="1,2")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--notifies", type=int, default=3000)
    parser.add_argument("--gap-ms", type=float, default=1.0, help="pause after each NOTIFY")
    args = parser.parse_args()
    counts = [int(count) for count in args.listeners.split(",")]
    with tempfile.TemporaryDirectory() as scratch, base.postgres_url(Path(scratch)) as (url, postmaster):
        dsn = url.replace("postgresql+asyncpg://", "postgresql://")  # (asyncpg's own form)
        print("| round | listening connections | PostgreSQL CPU ms per NOTIFY | sender's round trip p50 ms | heard |")
        print("|---|---:|---:|---:|---:|")
        for round_ in range(args.rounds):
            order = counts if round_ % 2 == 0 else list(reversed(counts))
            for count in order:
                cpu, trip, heard = asyncio.run(_round(dsn, count, args.notifies, postmaster, args.gap_ms / 1000))
                print(f"| {round_ + 1} | {count} | {cpu:.3f} | {trip:.3f} | {heard} |", flush=True)


if __name__ == "__main__":
    main()
