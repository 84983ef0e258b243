"""How long SQLite's write lock is held, by whom, per run (issue 17).

With 16 clients a SQLite server's runs a second can be bounded by the
process's write lock (app/db.py's SQLiteWriters) rather than by its CPU:
every write transaction queues for it. This starts the server (``python -m
app serve``, a worker in it, offline model) from a source tree, with the
lock's grant and release timed, drives clients that stream or poll runs
back to back, and prints per kind of holder (a claim, a collected create or
group of them, any other transaction) the holdings, the mean time held and
waited for, and per run the holdings and the time held; then the lock's
busy share and the server's CPU per run. Timed in the server by wrapping
the lock's private methods (``_WriteLock``); asserts nothing.

    .venv/bin/python bench/write_lock.py --clients 16 --mode stream --seconds 6
    .venv/bin/python bench/write_lock.py --tree /tmp/main-tree --mode poll   # another tree, same harness
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead
import runs as base

# Holder kinds by a function on the stack that takes the lock (the first found).
# Today a collected transaction's lock is taken in its group's task
# (_send_group); the commit_collected* entries match older trees too, where
# the committing task took it itself.
KINDS = (
    ("claiming", "claim"),
    ("_send_group", "collected (a group)"),
    ("commit_collected_seen_through", "collected"),
    ("commit_collected", "collected"),
)


def _serve(dump_to: str, argv: list[str]) -> None:
    """The server, its write lock timed; totals written to ``dump_to`` on SIGUSR1."""
    from app import db

    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])  # holdings, held s, waited s
    holding: dict[str, Any] = {"since": None, "kind": "", "waited": 0.0}

    def kind() -> str:
        frame = sys._getframe(2)
        names = set()
        while frame is not None:
            names.add(frame.f_code.co_name)
            frame = frame.f_back
        return next((label for name, label in KINDS if name in names), "other transaction")

    real_try, real_acquire, real_release = db._WriteLock.try_acquire, db._WriteLock.acquire, db._WriteLock.release

    def try_acquire(lock: Any) -> bool:
        taken = bool(real_try(lock))
        if taken:
            holding.update(since=time.perf_counter(), kind=kind(), waited=0.0)
        return taken

    async def acquire(lock: Any) -> None:
        asked, what = time.perf_counter(), kind()
        await real_acquire(lock)  # (its free lock through try_acquire above, timed there)
        if holding["kind"] is None:  # handed over by a release, which timed the grant
            holding.update(kind=what, waited=holding["since"] - asked)

    def release(lock: Any) -> None:
        now = time.perf_counter()
        if holding["since"] is not None:
            entry = totals[holding["kind"] or "cancelled once handed the lock"]
            entry[0] += 1
            entry[1] += now - holding["since"]
            entry[2] += holding["waited"]
            holding["since"] = None
        real_release(lock)
        if lock._held:  # handed to a waiter, which names itself once it runs (acquire above)
            holding.update(since=now, kind=None, waited=0.0)

    db._WriteLock.try_acquire, db._WriteLock.acquire, db._WriteLock.release = try_acquire, acquire, release

    def dump(*_: Any) -> None:
        Path(dump_to).write_text(json.dumps({"totals": totals, "cpu": time.process_time(), "at": time.perf_counter()}))

    signal.signal(signal.SIGUSR1, dump)
    from app.__main__ import main

    sys.exit(main(argv))


def _read(server: subprocess.Popen[bytes], dump_to: Path) -> dict[str, Any]:
    dump_to.unlink(missing_ok=True)
    server.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not dump_to.exists() or not dump_to.read_text():
        if time.monotonic() > deadline:
            raise SystemExit("the server wrote no totals")
        time.sleep(0.05)
    loaded: dict[str, Any] = json.loads(dump_to.read_text())
    return loaded


async def _drive(port: int, clients: int, mode: str, seconds: float) -> int:
    setup = overhead.Client("127.0.0.1", port)
    _, data = await setup.call("POST", "/v1/assistants", {"model": "offline-bench", "instructions": "x"})
    await setup.close()
    assistant = json.loads(data)["id"]
    once = overhead.stream_once if mode == "stream" else overhead.poll_once
    done = 0

    async def client() -> None:
        nonlocal done
        connection = overhead.Client("127.0.0.1", port)
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                await once(connection, assistant, "offline-bench", "hello there")
                done += 1
        finally:
            await connection.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return done


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        _serve(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=base.REPO, help="source tree whose app/ is served")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--mode", choices=("stream", "poll"), default="stream")
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="write-lock-"))
    dump_to = scratch / "totals.json"
    port = base.free_port()
    env = {**os.environ, "ASSISTANTS_API_KEYS": "", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    env.setdefault("ASSISTANTS_WORKER_CONCURRENCY", "80")
    env["PYTHONPATH"] = str(args.tree.resolve())
    command = [
        sys.executable, str(Path(__file__).resolve()), "--serve", str(dump_to),
        "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(scratch / "data"),
        "--database-url", f"sqlite+aiosqlite:///{scratch / 'data' / 'db.sqlite'}", "--log-level", "warning",
    ]  # fmt: skip
    log = scratch / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=args.tree, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        asyncio.run(base.wait_ready(base.Server(process, port, log)))
        asyncio.run(_drive(port, args.clients, args.mode, 2.0))  # warm-up
        before = _read(process, dump_to)
        started = time.perf_counter()
        runs = asyncio.run(_drive(port, args.clients, args.mode, args.seconds))
        wall = time.perf_counter() - started
        after = _read(process, dump_to)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
    print(f"{args.tree}: {args.clients} clients, {args.mode}, {runs} runs in {wall:.1f} s ({runs / wall:.0f}/s)\n")
    print("| holder | holdings | held ms (mean) | waited ms (mean) | holdings per run | held ms per run |")
    print("|---|---:|---:|---:|---:|---:|")
    busy = 0.0
    for what, (count, held, waited) in sorted(after["totals"].items()):
        count -= before["totals"].get(what, [0, 0.0, 0.0])[0]
        held -= before["totals"].get(what, [0, 0.0, 0.0])[1]
        waited -= before["totals"].get(what, [0, 0.0, 0.0])[2]
        busy += held
        mean = 1000 / max(count, 1)
        print(
            f"| {what} | {count} | {held * mean:.2f} | {waited * mean:.2f} | "
            f"{count / max(runs, 1):.2f} | {1000 * held / max(runs, 1):.2f} |"
        )
    span = after["at"] - before["at"]
    cpu = after["cpu"] - before["cpu"]
    print(
        f"\nlock held {100 * busy / span:.0f} % of {span:.1f} s; "
        f"server CPU {1000 * cpu / max(runs, 1):.2f} ms/run ({100 * cpu / span:.0f} % of a core)"
    )


if __name__ == "__main__":
    main()
