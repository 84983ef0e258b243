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

Printed per session (a fresh start of the stub, the databases and both
servers): p50/p95 of each side over the floor; the median of the paired
differences with a distribution-free 95 % interval (the order statistics of
the sign test: no assumption of a shape); the share of rounds B was faster;
each server's CPU per run over the rounds (each serves only its own runs)
and PostgreSQL's, both databases together. Then the median of the sessions'
medians and their range. Several sessions, because a session's own luck
(where the scheduler put four busy processes on two cores) moves its median
by more than its interval says: the same A/B gave -0.19 ms (-0.31, -0.08)
and +0.05 ms (-0.07, +0.16) in two sessions a minute apart. An A/A run (the
same tree on both sides) shows what the method separates on the day.

    .venv/bin/python bench/paired.py --a /tmp/main-tree --sessions 6 --pairs 1000   # main against this tree
    .venv/bin/python bench/paired.py --b-env ASSISTANTS_SOME_SWITCH=1 --db postgres --mode poll
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead
import runs as base

ONCE = {
    "stream": overhead.stream_once,
    "poll": overhead.poll_once,
    "thread-stream": overhead.stream_on_thread_once,
    "thread-poll": overhead.poll_on_thread_once,
    "tool-poll": overhead.tool_poll_once,  # --path offline: submit_tool_outputs and its polls
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
    (scratch / "pg").mkdir()
    with base.postgres_url(scratch / "pg", also=("bench_b",)) as (url, postmaster):
        yield url, url.replace("/bench?", "/bench_b?"), postmaster


def environment(items: list[str]) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items)


@dataclass
class Session:
    """One start of both servers: its rounds' figures."""

    a: Side
    b: Side
    floor: list[float]
    database_ms: float | None  # PostgreSQL's CPU a run over the rounds, both databases

    def differences(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.a.ms, self.b.ms, strict=True)]


def session(args: argparse.Namespace) -> Session:
    """Stub, databases and both servers started afresh, then the rounds."""
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
    return Session(a, b, floor, database_ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, default=overhead.REPO, help="the working tree side A runs (default: this)")
    parser.add_argument("--b", type=Path, default=overhead.REPO, help="the working tree side B runs (default: this)")
    parser.add_argument("--a-env", action="append", default=[], metavar="NAME=VALUE", help="for A's server only")
    parser.add_argument("--b-env", action="append", default=[], metavar="NAME=VALUE", help="for B's server only")
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--mode", choices=sorted(ONCE), default="stream")
    parser.add_argument("--path", choices=["direct", "litellm", "offline"], default="direct")
    parser.add_argument("--pairs", type=int, default=1000, help="rounds a session")
    parser.add_argument("--tokens", type=int, default=overhead.TOKENS, help="words in each of the stub's answers")
    parser.add_argument(
        "--token-gap-ms", type=float, default=0.0, help="the stub's wait before each word (a model's pace; 0: at once)"
    )
    parser.add_argument("--warmup", type=int, default=50, help="untimed rounds a session first")
    parser.add_argument(
        "--sessions",
        type=int,
        default=5,
        help="fresh starts of both servers: a start's own luck (where the scheduler puts the processes on the "
        "cores) moves a session's median difference more than its interval says",
    )
    args = parser.parse_args()
    overhead.TOKENS, overhead.TOKEN_GAP_MS = args.tokens, args.token_gap_ms  # read when the stub starts
    print(
        f"{args.db}, {args.mode}, {args.path}, {args.tokens}-word answers {args.token_gap_ms:g} ms apart: "
        f"{args.sessions} sessions of {args.pairs} "
        f"rounds after {args.warmup} "
        f"warm-up; load average {os.getloadavg()[0]:.2f} before\n"
        f"A: {args.a.resolve()} {' '.join(args.a_env)}\nB: {args.b.resolve()} {' '.join(args.b_env)}\n"
    )
    print(
        "| session | floor p50 | A p50 over floor | B p50 over floor | A p95 | B p95 "
        "| B - A paired median (95 % interval) | B faster | server CPU ms/run A / B | PostgreSQL CPU ms/run |\n"
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"
    )
    sessions = []
    for number in range(1, args.sessions + 1):
        done = session(args)
        sessions.append(done)
        print(row(str(number), done, args.pairs), flush=True)
    medians = sorted(median_interval(done.differences())[0] for done in sessions)
    cpu = sorted((done.b.cpu_seconds - done.a.cpu_seconds) * 1000 / args.pairs for done in sessions)
    print(
        f"\nB - A over the sessions: median of the session medians {statistics.median(medians):+.3f} ms "
        f"(from {medians[0]:+.3f} to {medians[-1]:+.3f}; {sum(m < 0 for m in medians)} of {len(medians)} below 0); "
        f"server CPU a run {statistics.median(cpu):+.3f} ms (from {cpu[0]:+.3f} to {cpu[-1]:+.3f}); "
        f"load average {os.getloadavg()[0]:.2f} after"
    )


def row(label: str, done: Session, pairs: int) -> str:
    floor = percentile(done.floor, 0.5)
    a, b = done.a, done.b
    middle, low, high = median_interval(done.differences())
    faster = sum(1 for d in done.differences() if d < 0) / pairs
    database = "-" if done.database_ms is None else f"{done.database_ms:.2f}"
    return (
        f"| {label} | {floor:.2f} | +{percentile(a.ms, 0.5) - floor:.2f} | +{percentile(b.ms, 0.5) - floor:.2f} | "
        f"{percentile(a.ms, 0.95):.2f} | {percentile(b.ms, 0.95):.2f} | {middle:+.3f} ({low:+.3f}, {high:+.3f}) | "
        f"{faster:.0%} | {a.cpu_seconds * 1000 / pairs:.2f} / {b.cpu_seconds * 1000 / pairs:.2f} | {database} |"
    )


if __name__ == "__main__":
    main()
