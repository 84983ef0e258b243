"""Two servers measured against each other, interleaved (issue 17).

The changes left on the run path are worth 0.1-0.3 ms each, and this
machine's speed drifts by more than that between two runs of
bench/overhead.py a minute apart (A, B, B, A of one change has reversed its
own verdict). So this script starts both servers at once, A and B (two
working trees, or one tree with two environments), each on its own database
(two SQLite files, or two databases in one embedded PostgreSQL cluster), and
times them in rounds: each round a streamed completion straight to the
instant stub (the floor), then one run on A and one on B, in the order A B,
then B A, alternately. Whatever slows the machine in a round slows both of
its runs, and the paired difference B - A cancels it.

Printed: p50/p95 of each side and of the floor; the median of the paired
differences with a distribution-free 95 % interval (the order statistics of
the sign test: no assumption of a shape); the share of rounds B was faster;
each server's CPU per run over the rounds (each serves only its own runs),
and PostgreSQL's CPU over the rounds, both databases together. An A/A run
(the same tree on both sides) shows what the method separates on the day.

    .venv/bin/python bench/paired.py --b /tmp/other-tree --pairs 400
    .venv/bin/python bench/paired.py --b-env ASSISTANTS_SOME_SWITCH=1 --db postgres --mode poll
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead
import runs as base

ONCE = {
    "stream": overhead.stream_once,
    "poll": overhead.poll_once,
    "thread-stream": overhead.stream_on_thread_once,
    "thread-poll": overhead.poll_on_thread_once,
}


@dataclass
class Side:
    """One server of the pair: where it listens, its process, its assistant, its timings."""

    label: str
    port: int
    pid: int
    assistant_id: str = ""
    client: overhead.Client | None = None
    ms: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median_interval(differences: list[float]) -> tuple[float, float, float]:
    """The median of the differences and its distribution-free 95 % interval:
    the k-th smallest and k-th largest, k from the normal approximation of the
    binomial(n, 1/2) (the sign test's), good from a few dozen pairs up."""
    ordered = sorted(differences)
    n = len(ordered)
    k = max(0, math.floor((n - 1.96 * math.sqrt(n)) / 2))
    middle = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    return middle, ordered[k], ordered[n - 1 - k]


async def measure(a: Side, b: Side, stub_port: int, args: argparse.Namespace) -> list[float]:
    once = ONCE[args.mode]
    model = overhead.MODELS[args.path]
    floor_client = overhead.Client("127.0.0.1", stub_port)
    for side in (a, b):
        side.client = overhead.Client("127.0.0.1", side.port)
        _, data = await side.client.call("POST", "/v1/assistants", {"model": model, "instructions": "Be brief."})
        side.assistant_id = json.loads(data)["id"]
    floor: list[float] = []
    try:

        async def timed(side: Side, index: int) -> float:
            assert side.client is not None
            return (await once(side.client, side.assistant_id, model, f"hello {index}")).seconds * 1000

        for index in range(args.warmup):
            await overhead.floor_once(floor_client)
            await timed(a, index)
            await timed(b, index)
        before = {side.label: base.tree_cpu(side.pid) for side in (a, b)}
        for index in range(args.pairs):
            floor.append((await overhead.floor_once(floor_client)).seconds * 1000)
            for side in (a, b) if index % 2 == 0 else (b, a):
                side.ms.append(await timed(side, index))
        for side in (a, b):
            side.cpu_seconds = base.tree_cpu(side.pid) - before[side.label]
    finally:
        await floor_client.close()
        for side in (a, b):
            if side.client is not None:
                await side.client.close()
    return floor


@contextmanager
def databases(db: str, scratch: Path) -> Iterator[tuple[str, str, int | None]]:
    """Two empty databases (each server migrates its own on start), and PostgreSQL's postmaster."""
    if db == "sqlite":
        yield f"sqlite+aiosqlite:///{scratch / 'a.db'}", f"sqlite+aiosqlite:///{scratch / 'b.db'}", None
        return
    import asyncpg  # type: ignore[import-untyped]

    (scratch / "pg").mkdir()
    with base.postgres_url(scratch / "pg") as (url, postmaster):
        socket_dir = url.split("host=", 1)[1]

        async def second() -> None:
            connection = await asyncpg.connect(user="postgres", database="postgres", host=socket_dir)
            try:
                await connection.execute("CREATE DATABASE bench_b")
            finally:
                await connection.close()

        asyncio.run(second())
        yield url, url.replace("/bench?", "/bench_b?"), postmaster


def environment(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, default=overhead.REPO, help="the working tree side A runs (default: this)")
    parser.add_argument("--b", type=Path, default=overhead.REPO, help="the working tree side B runs (default: this)")
    parser.add_argument("--a-env", action="append", default=[], metavar="NAME=VALUE", help="for A's server only")
    parser.add_argument("--b-env", action="append", default=[], metavar="NAME=VALUE", help="for B's server only")
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--mode", choices=sorted(ONCE), default="stream")
    parser.add_argument("--path", choices=["direct", "litellm", "offline"], default="direct")
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-paired-")))
        stub_port = stack.enter_context(overhead.stub(scratch))
        url_a, url_b, postmaster = stack.enter_context(databases(args.db, scratch))
        entries = overhead.routing(stub_port, [args.path])
        sides = []
        for label, tree, url, env in [("A", args.a, url_a, args.a_env), ("B", args.b, url_b, args.b_env)]:
            port, pid = stack.enter_context(overhead.server(url, scratch, entries, environment(env), tree.resolve()))
            sides.append(Side(label, port, pid))
        a, b = sides
        database_before = base.tree_cpu(postmaster) if postmaster else 0.0
        floor = asyncio.run(measure(a, b, stub_port, args))
        database_ms = (base.tree_cpu(postmaster) - database_before) * 1000 / (2 * args.pairs) if postmaster else None
    report(a, b, floor, args, load_before, database_ms)


def report(a: Side, b: Side, floor: list[float], args: argparse.Namespace, load: float, database_ms: float | None) -> None:
    floor_p50 = percentile(floor, 0.5)
    print(
        f"{args.db}, {args.mode}, {args.path}: {args.pairs} pairs after {args.warmup} warm-up; "
        f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after\n"
        f"A: {args.a.resolve()} {' '.join(args.a_env)}\nB: {args.b.resolve()} {' '.join(args.b_env)}\n"
    )
    print("| side | p50 ms | p95 ms | p50 over floor ms | server CPU ms/run |\n|---|---:|---:|---:|---:|")
    print(f"| floor | {floor_p50:.2f} | {percentile(floor, 0.95):.2f} | - | - |")
    for side in (a, b):
        print(
            f"| {side.label} | {percentile(side.ms, 0.5):.2f} | {percentile(side.ms, 0.95):.2f} | "
            f"+{percentile(side.ms, 0.5) - floor_p50:.2f} | {side.cpu_seconds * 1000 / args.pairs:.2f} |"
        )
    differences = [later - earlier for earlier, later in zip(a.ms, b.ms, strict=True)]
    middle, low, high = median_interval(differences)
    faster = sum(1 for d in differences if d < 0) / len(differences)
    print(
        f"\nB - A, paired: median {middle:+.3f} ms, 95 % interval [{low:+.3f}, {high:+.3f}] ms; "
        f"B faster in {faster:.0%} of pairs"
    )
    if database_ms is not None:
        print(f"PostgreSQL CPU over the rounds: {database_ms:.2f} ms per run (both databases)")


if __name__ == "__main__":
    main()
