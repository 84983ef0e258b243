"""code_interpreter sandbox costs, measured on the sessions directly (no HTTP,
no model): what a run pays on top of the engine when it calls the tool.

* start: a fresh session's first trivial call (``pass``), i.e. bubblewrap
  namespaces + mounts + the REPL's interpreter start + one round trip;
* round trip: a trivial call on a warm session (JSON over pipes, output
  capture, the /mnt/data snapshot before and after);
* first data-stack import: ``import numpy, pandas, matplotlib.pyplot`` on a
  warm session (what the first real cell of a thread pays);
* capacity: N sessions alive at once, each with the data stack imported, all
  answering a call concurrently; the resident memory they hold (sum of VmRSS
  of every process in each sandbox) and what that means for this machine.

Prints markdown; writes nothing outside the system temp directory.

    .venv/bin/python bench/code_interpreter.py
    .venv/bin/python bench/code_interpreter.py --starts 20 --sessions 64
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from app.sandbox import Sandboxes, Session
from app.settings import Settings

DATA_STACK = "import numpy, pandas, matplotlib.pyplot"


def _ms(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return f"{statistics.median(ordered) * 1000:.1f} ms (p95 {p95 * 1000:.1f} ms, n={len(ordered)})"


async def _timed(session: Session, code: str) -> float:
    start = time.perf_counter()
    result = await session.run(code)
    assert not result.error, result.logs
    return time.perf_counter() - start


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(parent, []).append(int(entry))
    return tree


def _rss_kib(root: int, tree: dict[int, list[int]]) -> int:
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack += tree.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def _available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


async def bench(starts: int, calls: int, sessions: int) -> None:
    settings = Settings(data_dir=Path(tempfile.mkdtemp(prefix="bench-ci-")), sandbox_max_sessions=sessions + starts)
    sandboxes = Sandboxes(settings)
    try:
        cold = [await _timed(await sandboxes.session(f"start-{n}"), "pass") for n in range(starts)]
        warm_session = await sandboxes.session("start-0")
        warm = [await _timed(warm_session, "pass") for _ in range(calls)]
        imports = [await _timed(await sandboxes.session(f"start-{n}"), DATA_STACK) for n in range(starts)]
        for n in range(starts):
            await sandboxes.discard(f"start-{n}")
        print(f"mode: {settings.sandbox}, CPUs: {os.cpu_count()}, memory available: {_available_mib()} MiB\n")
        print("| measure | median |\n|---|---|")
        print(f"| session start + first trivial call | {_ms(cold)} |")
        print(f"| trivial call round trip (warm session) | {_ms(warm)} |")
        print(f"| first `{DATA_STACK}` in a session | {_ms(imports)} |")
        await _capacity(sandboxes, sessions)
    finally:
        await sandboxes.close()


async def _capacity(sandboxes: Sandboxes, sessions: int) -> None:
    before = _available_mib()
    live = [await sandboxes.session(f"live-{n}") for n in range(sessions)]
    started = time.perf_counter()
    await asyncio.gather(*(_timed(session, DATA_STACK) for session in live))
    warmup = time.perf_counter() - started
    started = time.perf_counter()
    round_trips = await asyncio.gather(*(_timed(session, "x = sum(range(1000))") for session in live))
    together = time.perf_counter() - started
    tree = _children()
    rss = [_rss_kib(session.process.pid, tree) / 1024 for session in live if session.process is not None]
    used = before - _available_mib()
    print(f"\n{sessions} sessions alive at once, each with the data stack imported:\n")
    print("| measure | value |\n|---|---|")
    print(f"| start + import in all {sessions}, concurrently | {warmup:.2f} s |")
    print(
        f"| one trivial call in all {sessions}, concurrently | {together * 1000:.0f} ms (per call {_ms(round_trips)}) |"
    )
    print(f"| resident memory per session | {statistics.median(rss):.0f} MiB (sum of VmRSS in its sandbox) |")
    print(f"| MemAvailable drop for all {sessions} | {used} MiB |")
    per_session = max(used / sessions, 1)
    print(f"| sessions this machine holds by memory (MemAvailable / drop per session) | ~{int(before / per_session)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=int, default=10, help="fresh sessions to time")
    parser.add_argument("--calls", type=int, default=200, help="warm round trips to time")
    parser.add_argument("--sessions", type=int, default=32, help="sessions alive at once for the capacity figure")
    args = parser.parse_args()
    asyncio.run(bench(args.starts, args.calls, args.sessions))


if __name__ == "__main__":
    main()
