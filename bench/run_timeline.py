"""Where one client's run spends its time: a timeline of a lone run (issue 17).

Starts the real server (``python -m app serve``) with a few of its functions
wrapped to note the time (``time.perf_counter()``, the same clock in every
process here) and the event loop thread's CPU (``time.thread_time()``) as they
are entered and left, then drives runs one at a time: a streamed
``POST /threads/runs`` or the SDK's ``create_and_poll``. Each note is placed in
the run during whose request it was made; the table gives, per step, the
median time since the client sent the request and the median loop CPU since
the step before (both per run), and how many times the step happened per run.

    .venv/bin/python bench/run_timeline.py --db sqlite --mode stream --runs 300
    .venv/bin/python bench/run_timeline.py --db postgres --mode poll --runs 300
    .venv/bin/python bench/run_timeline.py --db sqlite --mode thread-poll --runs 300  # a run on a thread
    .venv/bin/python bench/run_timeline.py --db sqlite --mode tool --runs 300  # a function call's answer
    .venv/bin/python bench/run_timeline.py --db sqlite --path direct --runs 300  # a direct route to the stub
    .venv/bin/python bench/run_timeline.py --path direct --profile /tmp/direct.prof  # the server under cProfile
    .venv/bin/python bench/run_timeline.py --db postgres --path direct --task-steps  # every task's step noted
    .venv/bin/python bench/run_timeline.py --db postgres --path direct \
        --note app.worker:Worker.prepare:prepare --note app.db:autocommit_connection:checkout  # more steps

``--path direct`` starts overhead.py's model stub and a routing file of its
direct and offline entries (overhead.routing) and runs ``gpt-4o`` on the
direct route; ``--profile FILE`` writes the server's cProfile stats of the
measured runs (warm-up left out) to FILE (then the table's CPU includes the
profiler's). ``--task-steps`` notes each step of every task the server's loop
runs (``task <coroutine>:<line it resumes at>``), its tasks made of asyncio's
Python Task class (slower than the C one: compare within a table): what runs
between two steps of a run, and in which order. ``--note
MODULE:NAME:LABEL`` wraps one more function (``NAME`` a module attribute,
or ``Class.method``) as the fixed steps are wrapped: a coroutine function
noted where it is entered and left, any other where it is called; it is
caught only where it is called through that attribute (not where another
module imported the function by name).

The wrapping costs CPU of its own (a few µs a note): compare steps, not totals.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import functools
import importlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead
import runs as base

# (label, perf_counter, loop thread CPU or None off the loop thread)
Note = tuple[str, float, float | None]


def _noting(notes: list[Note]) -> Callable[[str], None]:
    main = threading.main_thread()

    def note(label: str) -> None:
        on_loop = threading.current_thread() is main
        notes.append((label, time.perf_counter(), time.thread_time() if on_loop else None))

    return note


def _wrap(owner: Any, name: str, label: str, note: Callable[[str], None], *, leave: bool = True) -> None:
    original = getattr(owner, name)
    if asyncio.iscoroutinefunction(original):

        @functools.wraps(original)
        async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
            note(f"{label} >")
            try:
                return await original(*args, **kwargs)
            finally:
                if leave:
                    note(f"{label} <")

        setattr(owner, name, wrapped_async)
        return

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        note(label)
        return original(*args, **kwargs)

    setattr(owner, name, wrapped)


def _wrap_named(wanted: str, note: Callable[[str], None]) -> None:
    """``--note MODULE:NAME:LABEL``: the function ``NAME`` of ``MODULE``
    (``Class.method`` for a method) wrapped as _wrap wraps the fixed steps."""
    module_name, name, label = wanted.split(":", 2)
    owner: Any = importlib.import_module(module_name)
    *classes, attribute = name.split(".")
    for class_name in classes:
        owner = getattr(owner, class_name)
    _wrap(owner, attribute, label, note)


def _note_writes(transport: Any, note: Callable[[str], None]) -> None:
    """A note per socket write: a flush that holds bytes (one scheduled
    after an early flush finds none)."""
    flush = transport.flush

    @functools.wraps(flush)
    def noted(self: Any) -> None:
        if self._held:
            note("socket write")
        flush(self)

    transport.flush = noted


def _note_task_steps(note: Callable[[str], None]) -> None:
    """A note at each step of every task: asyncio's Python Task, its step
    wrapped, made by every loop uvloop creates (a task factory)."""
    import asyncio.tasks

    import uvloop

    python_task: Any = asyncio.tasks._PyTask  # type: ignore[attr-defined]
    step = python_task._Task__step

    def noted_step(task: Any, exc: BaseException | None = None) -> Any:
        coro = task._coro
        frame = getattr(coro, "cr_frame", None)
        name = getattr(coro, "__qualname__", type(coro).__name__)
        note(f"task {name}:{frame.f_lineno}" if frame is not None else f"task {name}")
        return step(task, exc)

    python_task._Task__step = noted_step
    new_loop = uvloop.new_event_loop

    def noting_loop() -> asyncio.AbstractEventLoop:
        loop = new_loop()
        loop.set_task_factory(lambda loop, coro, **options: python_task(coro, loop=loop, **options))
        return loop

    uvloop.new_event_loop = noting_loop


def serve_traced(out: str, argv: list[str], profile: str | None = None) -> int:
    """The server, its steps noted; the notes written to ``out`` at exit
    (with ``profile``: cProfile stats of the event loop thread, from the
    first run after the warm-up, SIGUSR1, to exit)."""
    from app import __main__ as entry
    from app import bus, held_back, worker
    from app.api import poll_hold, write_coalescing
    from app.api import runs as api_runs
    from app.runner import execute
    from app.services import run_execution

    notes: list[Note] = []
    note = _noting(notes)
    _wrap(api_runs, "_queue_run", "create (parsed > committed <)", note)
    from app.services import run_state, run_steps
    from app.services import runs as service_runs

    # (--mode tool: the submit's own steps)
    _wrap(service_runs, "submit_tool_outputs", "submit: its service call", note)
    _wrap(run_steps, "in_progress", "run_steps.in_progress read", note)
    _wrap(run_state, "transition", "run_state.transition", note)
    _wrap(worker.Worker, "tick", "worker tick", note)
    _wrap(run_execution, "claim_runs", "claim statement", note)
    _wrap(execute.RunExecution, "_finish_at_once", "answer at once", note)
    _wrap(execute, "claim_and_start", "claim transaction", note)
    if hasattr(execute, "hand_off"):  # branch handoff: a run created here handed to this worker with its row
        _wrap(execute, "hand_off", "hand-off transaction", note)
    if hasattr(execute, "take_started"):  # branch startfold: a run its create started, taken with no statement
        _wrap(execute, "take_started", "hand-off, started by its create (take_started)", note)
    _wrap(bus.EventBus, "deliver", "entries handed to followers", note)
    _note_writes(write_coalescing.CoalescingTransport, note)
    from app.llm import direct  # its steps, where a run takes a direct route (--path direct)

    _wrap(direct, "stream", "direct: completion called", note)
    _wrap(direct._LoopClients, "send", "direct: request sent > answer's head <", note)
    from app.runner import turn

    # (Turn._open_message until 2026-12-02, _new_message since.)
    opening = "_new_message" if hasattr(turn.Turn, "_new_message") else "_open_message"
    _wrap(turn.Turn, opening, "turn: first text, its message opened", note)
    _wrap(turn.Turn, "_finish", "turn: Finish read", note)
    _wrap(execute.RunExecution, "_write_and_move", "turn's commit built and sent", note)
    _wrap(execute, "_read_into", "the answer's reader task (> started, < stream closed)", note)
    _wrap(poll_hold, "retrieve_when_stopped", "held poll", note)
    _wrap(held_back, "sent", "statement sent (held_back.sent)", note)
    try:
        from app import sqlite_driver

        _wrap(sqlite_driver.OneHopConnection, "commit_now", "hop: commit_now", note)
        _wrap(sqlite_driver.OneHopConnection, "commit_straight", "hop: commit_straight", note)
    except (ImportError, AttributeError):
        pass

    for wanted in filter(None, os.environ.get("TIMELINE_NOTES", "").split("\n")):
        _wrap_named(wanted, note)
    if os.environ.get("TIMELINE_TASK_STEPS"):
        _note_task_steps(note)

    profiler = None
    if profile is not None:
        import cProfile

        profiler = cProfile.Profile()
        signal.signal(signal.SIGUSR1, lambda *_: profiler.enable())

    def dump() -> None:
        Path(out).write_text(json.dumps(notes))
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile)

    atexit.register(dump)
    return entry.main(argv)


async def _drive(
    port: int, mode: str, count: int, model: str = "offline-bench", warmed: Callable[[], None] | None = None
) -> list[tuple[float, float]]:
    client = overhead.Client("127.0.0.1", port)
    _, data = await client.call("POST", "/v1/assistants", {"model": model, "instructions": "x"})
    assistant = json.loads(data)["id"]
    once = overhead.stream_once if mode == "stream" else overhead.poll_once
    on_thread = overhead.stream_on if mode == "thread-stream" else overhead.poll_on
    spans = []
    try:
        for index in range(count + 20):
            if mode == "tool":  # a run waiting for its function's output first, outside the span
                waiting = await overhead.waiting_for_call(client, assistant, model, "hello there")
                started = time.perf_counter()
                await overhead.answer_call(client, waiting)
            elif mode.startswith("thread-"):  # the thread and its message first, outside the span
                thread_id = await overhead.thread_with(client, "hello there")
                started = time.perf_counter()
                await on_thread(client, assistant, model, thread_id)
            else:
                started = time.perf_counter()
                await once(client, assistant, model, "hello there")
            if index == 19 and warmed is not None:
                warmed()
            if index >= 20:  # warm-up left out
                spans.append((started, time.perf_counter()))
    finally:
        await client.close()
    return spans


def _table(notes: list[Note], spans: list[tuple[float, float]]) -> list[str]:
    notes.sort(key=lambda item: item[1])
    offsets: defaultdict[str, list[float]] = defaultdict(list)
    cpu: defaultdict[str, list[float]] = defaultdict(list)
    counts: defaultdict[str, int] = defaultdict(int)
    order: dict[str, float] = {}
    cursor = 0
    for started, ended in spans:
        while cursor < len(notes) and notes[cursor][1] < started:
            cursor += 1
        seen: dict[str, int] = defaultdict(int)
        last_cpu = None
        while cursor < len(notes) and notes[cursor][1] <= ended:
            label, at, thread_cpu = notes[cursor]
            seen[label] += 1
            key = f"{label} #{seen[label]}" if seen[label] > 1 else label
            offsets[key].append((at - started) * 1000)
            counts[label] += 1
            if thread_cpu is not None:
                if last_cpu is not None:
                    cpu[key].append((thread_cpu - last_cpu) * 1000)
                last_cpu = thread_cpu
            cursor += 1
        for key, values in offsets.items():
            order.setdefault(key, statistics.median(values))
    walls = [(ended - started) * 1000 for started, ended in spans]
    lines = [
        f"runs {len(spans)}, client-seen p50 {statistics.median(walls):.2f} ms",
        "| step | in runs | p50 ms since the request | loop CPU ms since the step before (p50) |",
        "|---|---:|---:|---:|",
    ]
    for key in sorted(offsets, key=lambda key: statistics.median(offsets[key])):
        share = len(offsets[key]) / len(spans)
        if share < 0.2:
            continue
        spent = f"{statistics.median(cpu[key]):.3f}" if cpu[key] else ""
        lines.append(f"| {key} | {share:.2f} | {statistics.median(offsets[key]):.3f} | {spent} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument(
        "--mode",
        choices=["stream", "poll", "thread-stream", "thread-poll", "tool"],
        default="stream",
        help="thread-*: a run on a thread made first (POST /threads/{id}/runs), the thread outside the timeline;"
        " tool: a function call's answer (submit_tool_outputs and its polls; the run to it outside the timeline)",
    )
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--path", choices=["offline", "direct"], default="offline")
    parser.add_argument("--profile", metavar="FILE", help="the server's cProfile stats of the measured runs")
    parser.add_argument("--task-steps", action="store_true", help="a note at each step of every task")
    parser.add_argument(
        "--note",
        action="append",
        default=[],
        metavar="MODULE:NAME:LABEL",
        help="one more function noted (NAME: a function of MODULE, or Class.method), as LABEL; repeatable",
    )
    parser.add_argument("--serve-traced", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for wanted in args.note:  # told here, not as a server that fails to start
        if len(wanted.split(":", 2)) != 3 or not all(wanted.split(":", 2)):
            parser.error(f"--note {wanted!r} is not MODULE:NAME:LABEL")
    if args.serve_traced is not None:
        out, profile, *argv = args.serve_traced
        raise SystemExit(serve_traced(out, argv, profile or None))
    with tempfile.TemporaryDirectory(prefix="timeline-") as name, contextlib.ExitStack() as stack:
        scratch = Path(name)
        out = scratch / "notes.json"
        config: list[str] = []
        model = "offline-bench"
        if args.path == "direct":
            stub_port = stack.enter_context(overhead.stub(scratch))
            routing = scratch / "routing.json"
            routing.write_text(json.dumps({"model_list": overhead.routing(stub_port, ["direct", "offline"])}))
            config, model = ["--config", str(routing)], "gpt-4o"
        with overhead._database(args.db, scratch) as (url, _postmaster):
            port = base.free_port()
            data_dir = scratch / "data"
            data_dir.mkdir()
            command = [
                sys.executable, __file__, "--serve-traced", str(out), args.profile or "", "serve",
                "--host", "127.0.0.1", "--port", str(port), *config, "--data-dir", str(data_dir),
                "--database-url", url, "--log-level", "warning",
            ]  # fmt: skip
            env = {**os.environ, "ASSISTANTS_API_KEYS": "", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
            if args.task_steps:
                env["TIMELINE_TASK_STEPS"] = "1"
            if args.note:
                env["TIMELINE_NOTES"] = "\n".join(args.note)  # (a label may hold commas)
            # This tree's app: the script's own directory comes first on the
            # server's sys.path, not the tree, and a venv's editable install of
            # another tree (a worktree sharing it) would supply its app.
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(base.REPO), os.environ.get("PYTHONPATH")]))
            log = scratch / "server.log"
            with log.open("wb") as sink:
                process = subprocess.Popen(command, cwd=base.REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
            try:
                asyncio.run(base.wait_ready(base.Server(process, port, log)))
                warmed = (lambda: process.send_signal(signal.SIGUSR1)) if args.profile else None
                spans = asyncio.run(_drive(port, args.mode, args.runs, model, warmed))
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
        notes = [tuple(note) for note in json.loads(out.read_text())]
    print(f"{args.db}, {args.mode}, {args.path}, load average {os.getloadavg()[0]:.2f}")
    print("\n".join(_table(notes, spans)))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
