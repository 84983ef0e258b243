"""Two servers' throughput under load, measured against each other in alternating bursts (issue 17).

bench/paired.py pairs one client's runs; a change to what the server does
under load (how many clients' runs share a claim, a statement per run or per
batch) shows only with many clients, and this machine's speed drifts between
two runs of bench/overhead.py a minute apart by more than such a change moves
runs/s (the same tree gave 136 and 287 runs/s within ten minutes). So, as
paired.py does for latency, both servers are started at once (two working
trees, each on its own database: two SQLite files, or two databases in one
embedded PostgreSQL cluster) and measured in rounds: each round one burst of
``--clients`` clients on A and one on B (``--seconds`` each after a short
warm-up), in the order A B, then B A. Whatever slows the machine in a round
slows both of its bursts; the paired difference of runs/s (B - A) and of the
server's CPU per run cancel it.

Printed per session (a fresh start of the stub, the databases and both
servers): each side's median runs/s and server CPU ms a run over the rounds,
the median paired difference of runs/s with its distribution-free 95 %
interval (paired.median_interval), the rounds B was ahead, PostgreSQL's CPU
a run of each side. Then the median of the sessions' medians.

    .venv/bin/python bench/paired_load.py --a /tmp/main-tree --db postgres --mode poll --clients 16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead
import paired

WARMUP_SECONDS = 0.5


@dataclass
class Side:
    label: str
    port: int
    pid: int
    runs_per_second: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # the server's, a run, each burst
    database_ms: list[float] = field(default_factory=list)  # PostgreSQL's, a run, each burst
    errors: int = 0


async def burst(side: Side, assistant_id: str, args: argparse.Namespace, postmaster: int | None) -> None:
    """One load point on ``side``: its runs/s and CPU per run noted."""
    model = overhead.MODELS[args.path]
    once_of = paired.ONCE[args.mode]

    async def once(client: overhead.Client, index: int) -> overhead.Sample:
        return await once_of(client, assistant_id, model, f"hello {index}")

    done = await overhead.load(side.port, side.pid, args.clients, args.seconds, WARMUP_SECONDS, once, postmaster)
    count = len(done.samples)
    side.errors += len(done.errors)
    side.runs_per_second.append(count / args.seconds)
    side.cpu_ms.append(done.cpu * 1000 / count if count else float("nan"))
    if postmaster is not None:
        side.database_ms.append(done.database_cpu * 1000 / count if count else float("nan"))


async def measure(a: Side, b: Side, args: argparse.Namespace, postmaster: int | None) -> None:
    model = overhead.MODELS[args.path]
    assistants = {}
    for side in (a, b):
        client = overhead.Client("127.0.0.1", side.port)
        try:
            _, data = await client.call("POST", "/v1/assistants", {"model": model, "instructions": "Be brief."})
        finally:
            await client.close()
        assistants[side.label] = json.loads(data)["id"]
    for index in range(args.rounds):
        for side in (a, b) if index % 2 == 0 else (b, a):
            await burst(side, assistants[side.label], args, postmaster)


def session(args: argparse.Namespace) -> tuple[Side, Side]:
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-paired-load-")))
        stub_port = stack.enter_context(overhead.stub(scratch))
        url_a, url_b, postmaster = stack.enter_context(paired.databases(args.db, scratch))
        entries = overhead.routing(stub_port, [args.path])
        sides = []
        for label, tree, url in [("A", args.a, url_a), ("B", args.b, url_b)]:
            port, pid = stack.enter_context(overhead.server(url, scratch, entries, {}, tree.resolve()))
            sides.append(Side(label, port, pid))
        a, b = sides
        # (Each burst's PostgreSQL CPU is the whole cluster's: the other
        # server is idle meanwhile, its backends asleep.)
        asyncio.run(measure(a, b, args, postmaster))
    return a, b


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, default=overhead.REPO, help="the working tree side A runs (default: this)")
    parser.add_argument("--b", type=Path, default=overhead.REPO, help="the working tree side B runs (default: this)")
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="postgres")
    parser.add_argument("--mode", choices=["poll", "stream"], default="poll")
    parser.add_argument("--path", choices=["direct", "litellm", "offline"], default="direct")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds a burst")
    parser.add_argument("--rounds", type=int, default=10, help="bursts a side a session")
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=overhead.TOKENS, help="words in each of the stub's answers")
    parser.add_argument(
        "--token-gap-ms", type=float, default=0.0, help="the stub's wait before each word (a model's pace; 0: at once)"
    )
    args = parser.parse_args()
    overhead.TOKENS, overhead.TOKEN_GAP_MS = args.tokens, args.token_gap_ms  # read when the stub starts
    print(
        f"{args.db}, {args.mode}, {args.path}, {args.clients} clients, {args.tokens}-word answers "
        f"{args.token_gap_ms:g} ms apart: {args.sessions} sessions of {args.rounds} "
        f"rounds of {args.seconds:g} s bursts; load average {os.getloadavg()[0]:.2f} before\n"
        f"A: {args.a.resolve()}\nB: {args.b.resolve()}\n"
    )
    print(
        "| session | A runs/s | B runs/s | B - A runs/s, paired median (95 % interval) | B ahead "
        "| server CPU ms/run A / B | PostgreSQL CPU ms/run A / B | errors A / B |\n"
        "|---|---:|---:|---|---:|---:|---:|---:|"
    )
    medians = []
    for number in range(1, args.sessions + 1):
        a, b = session(args)
        differences = [later - earlier for earlier, later in zip(a.runs_per_second, b.runs_per_second, strict=True)]
        middle, low, high = paired.median_interval(differences)
        medians.append(middle)
        ahead = sum(1 for d in differences if d > 0)
        database = f"{_median(a.database_ms):.2f} / {_median(b.database_ms):.2f}" if a.database_ms else "-"
        print(
            f"| {number} | {_median(a.runs_per_second):.0f} | {_median(b.runs_per_second):.0f} | "
            f"{middle:+.1f} ({low:+.1f}, {high:+.1f}) | {ahead} of {len(differences)} | "
            f"{_median(a.cpu_ms):.2f} / {_median(b.cpu_ms):.2f} | {database} | {a.errors} / {b.errors} |",
            flush=True,
        )
    medians.sort()
    print(
        f"\nB - A over the sessions: median of the session medians {statistics.median(medians):+.1f} runs/s "
        f"(from {medians[0]:+.1f} to {medians[-1]:+.1f}; {sum(m > 0 for m in medians)} of {len(medians)} above 0); "
        f"load average {os.getloadavg()[0]:.2f} after"
    )


if __name__ == "__main__":
    main()
