"""The create path's loop CPU, in process, without sockets (issue 17).

Builds the real application (``create_app``) on a scratch database, with no
worker (runs stay queued), and sends it requests through ASGI alone: a
thread-and-run (``POST /v1/threads/runs``) or a run on a thread made first
(``POST /v1/threads/{id}/runs``, the thread outside the measure), answered
as JSON or streamed (a streaming client leaves once the stream's head, the
events the create logged, is written); or, ``--mode message``, a message
added to a thread made first. Per round it prints the event loop thread's
CPU (``time.thread_time``) per request. What uvicorn parses and writes is
not in it (``bench/run_timeline.py`` has the whole request).

    .venv/bin/python bench/create_cpu.py --db sqlite --mode stream --runs 400 --rounds 5
    .venv/bin/python bench/create_cpu.py --db postgres --mode thread-poll

``--profile FILE`` writes a cProfile of the last round (its CPU figure then
includes the profiler's). Instructions, the same whatever the machine's
load (within about 0.5 %), counted over the last round alone:

    CREATE_CPU_CALLGRIND=1 valgrind --tool=callgrind --instr-atstart=no \
        .venv/bin/python bench/create_cpu.py --mode thread-poll --runs 100 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's app, not the installed one
import overhead

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


async def _call(app: Any, method: str, path: str, body: Any, stream: bool = False) -> bytes:
    raw = json.dumps(body).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5555),
        "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(raw)).encode())],
    }  # fmt: skip
    sent = False
    chunks: list[bytes] = []
    head = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await head.wait()  # a streaming client leaves once the stream's head is written
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200, message
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if stream and message.get("body"):
                head.set()

    await app(scope, receive, send)
    return b"".join(chunks)


# Run as ``valgrind --tool=callgrind --instr-atstart=no python bench/create_cpu.py ...``
# with CREATE_CPU_CALLGRIND=1: the last round's instructions are counted
# (callgrind_control switches counting on and off around it), and
# ``callgrind_annotate`` gives the count per create.
_UNDER_CALLGRIND = os.environ.get("CREATE_CPU_CALLGRIND") == "1"


def _callgrind(switch: str) -> None:
    subprocess.run(
        [shutil.which("callgrind_control") or "callgrind_control", switch, str(os.getpid())],
        check=True,
        capture_output=True,
    )


async def _rounds(app: Any, mode: str, runs: int, rounds: int, profile: str | None) -> list[float]:
    data = await _call(app, "POST", "/v1/assistants", {"model": "offline-bench", "instructions": "x"})
    assistant = json.loads(data)["id"]
    stream = mode.endswith("stream")
    results = []
    for index in range(rounds):
        threads = []
        if mode.startswith("thread-") or mode == "message":
            for _ in range(runs):
                made = await _call(app, "POST", "/v1/threads", {"messages": [{"role": "user", "content": "hello"}]})
                threads.append(json.loads(made)["id"])
        profiler = cProfile.Profile() if profile and index == rounds - 1 else None
        if _UNDER_CALLGRIND and index == rounds - 1:
            _callgrind("--instr=on")
        started = time.thread_time()
        if profiler is not None:
            profiler.enable()
        body: dict[str, Any]
        for number in range(runs):
            if mode == "message":
                body = {"role": "user", "content": "and another thing"}
                await _call(app, "POST", f"/v1/threads/{threads[number]}/messages", body)
            elif threads:
                body = {"assistant_id": assistant, "model": "offline-bench", "stream": stream}
                await _call(app, "POST", f"/v1/threads/{threads[number]}/runs", body, stream)
            else:
                body = {**overhead._run_body("offline-bench", "hello there", stream), "assistant_id": assistant}
                await _call(app, "POST", "/v1/threads/runs", body, stream)
        if _UNDER_CALLGRIND and index == rounds - 1:
            _callgrind("--instr=off")
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)  # type: ignore[arg-type]
        results.append((time.thread_time() - started) / runs * 1000)
    return results


async def _served(settings: Any, mode: str, runs: int, rounds: int, profile: str | None) -> list[float]:
    from app.__main__ import freeze_start_up_objects
    from app.main import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        freeze_start_up_objects()  # as `serve` does once started
        return await _rounds(app, mode, runs, rounds, profile)


def _main(db: str, mode: str, runs: int, rounds: int, profile: str | None) -> None:
    from app.__main__ import migrate
    from app.settings import Settings

    with tempfile.TemporaryDirectory(prefix="create-cpu-") as name:
        scratch = Path(name)
        with overhead._database(db, scratch) as (url, _postmaster):
            (scratch / "data").mkdir()
            settings = Settings(data_dir=scratch / "data", database_url=url, embedded_worker=False, api_keys=[])
            assert migrate(settings) == 0
            results = asyncio.run(_served(settings, mode, runs, rounds, profile))
    print(f"{db} {mode}: loop CPU per create, ms: " + ", ".join(f"{value:.3f}" for value in results)
          + f"; best {min(results):.3f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument(
        "--mode",
        choices=["stream", "poll", "thread-stream", "thread-poll", "message"],
        default="stream",
        help="message: POST /threads/{id}/messages on a thread made first (the SDK's step before a run on it)",
    )
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", help="a cProfile of the last round, written here")
    args = parser.parse_args()
    _main(args.db, args.mode, args.runs, args.rounds, args.profile)


if __name__ == "__main__":
    main()
