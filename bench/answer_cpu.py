"""The instant answer's CPU, in process (issue 17): a loop of lone runs of
the offline model, each created as the API creates it (``POST
/threads/runs``'s commit) and handed to the worker (``execute.hand_off``), the
event loop thread's CPU (``time.thread_time``) measured around the hand-off
alone. No HTTP, no worker loop, no streams: what is left is the worker side
of a handed run (its prompt, the offline answer, its rows and events, the
one transaction or statement that writes them) and its driver's work on the
loop thread.

    .venv/bin/python bench/answer_cpu.py --db sqlite --runs 500 --rounds 5
    .venv/bin/python bench/answer_cpu.py --db postgres --runs 500 --profile /tmp/pg.prof

``--provider`` (SQLite: PostgreSQL leaves a provider's run to the claim)
answers as a provider does, never at once: five deltas and a Finish from an
in-process stream (no socket, no HTTP client), so the hand-off commits the
run's start and ``execute.run`` then takes the streamed answer and commits
the end on its own; both are measured.

``--through-create`` counts from the API's create (api/runs.py's
``_queue_run``, a worker attached as the server's, handing as run_forever's
does) to the run's end: a branch that moves work between the create and
the hand-off (SQLite's fold of the start into the create) is compared whole.

``--profile`` runs cProfile around the hand-offs only (sort the file with
``python -m pstats``). ``--callgrind`` is for a run under valgrind: it
collects the loop thread's instructions inside the hand-offs only
(callgrind's client requests, from a few lines of C built with ``cc``), a
count that other processes' load does not change:

    valgrind --tool=callgrind --instr-atstart=no --collect-atstart=no \
        --callgrind-out-file=/tmp/cg.out .venv/bin/python bench/answer_cpu.py \
        --db sqlite --runs 100 --rounds 1 --warmup 20 --callgrind
    callgrind_annotate /tmp/cg.out | head   # "PROGRAM TOTALS" / runs
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from app import llm, orm
from app.runner import execute
from app.runtime import Runtime
from app.services import assistants, run_execution, runs
from app.services.projects import Project
from app.settings import Settings
from app.wire.assistants import AssistantCreate
from app.wire.runs import ThreadAndRunCreate

OWNER = "answer-cpu"
_PROJECT = Project(id=orm.DEFAULT_PROJECT_ID, name="default")


# What --breakdown times (inclusive loop CPU per run): (module, owner in it or "", function).
_STEPS = [
    ("app.runner.execute", "RunExecution", "_start_held"),
    ("app.runner.execute", "RunExecution", "_context"),
    ("app.runner.execute", "RunExecution", "_first_prompt"),
    ("app.services.run_execution", "", "handed_run"),
    ("app.services.run_execution", "", "claim_handed"),
    ("app.services.runs", "", "to_wire"),
    ("app.services.run_steps", "", "to_wire"),
    ("app.services.messages", "", "to_wire"),
    ("app.llm.facade", "LLM", "answer_at_once"),
    ("app.runner.turn", "Turn", "consume"),
    ("app.runner.turn", "Turn", "_open_message"),
    ("app.runner.turn", "Turn", "_on_text"),
    ("app.runner.turn", "Turn", "_close_message"),
    ("app.runner.execute", "RunExecution", "_after_turn"),
    ("app.runner.execute", "RunExecution", "_write"),
    ("app.runner.execute", "RunExecution", "_carried_move"),
    ("app.runner.execute", "RunExecution", "_write_and_move"),
    ("app.runner.execute", "RunExecution", "_move_unread"),
    ("app.services.run_state", "", "carried_move"),
    ("app.services.run_state", "", "transition"),
    ("app.services.core_rows", "", "insert_write"),
    ("app.services.core_rows", "", "insert_row"),
    ("app.services.core_rows", "", "update_row"),
    ("app.run_log", "RunLog", "append"),
    ("app.run_log", "RunLog", "committed"),
    ("app.services.run_events", "", "insert_carrying"),
    ("app.services.run_events", "", "insert_behind"),
    ("app.held_back", "", "run_now"),
    ("app.held_back", "", "hold_back"),
    ("app.held_back", "", "_active_connection"),
    ("app.held_back", "", "sent"),
    ("app.bus", "EventBus", "publish"),
    ("app.wire.events", "Event", "each"),
    ("app.wire.events", "Event", "of"),
]


def _timing(steps: dict[str, float]) -> None:
    """Wrap _STEPS so that each adds its inclusive loop CPU to ``steps``."""
    import functools
    import importlib
    import inspect

    for module_name, owner_name, name in _STEPS:
        module = importlib.import_module(module_name)
        owner: Any = getattr(module, owner_name) if owner_name else module
        original = inspect.getattr_static(owner, name)
        label = f"{module_name.rsplit('.', 1)[1]}.{owner_name + '.' if owner_name else ''}{name}"
        steps[label] = 0.0
        wrapped_class = isinstance(original, (classmethod, staticmethod))
        function = original.__func__ if wrapped_class else original

        def make(function: Any, label: str) -> Any:
            if inspect.iscoroutinefunction(function):

                @functools.wraps(function)
                async def timed_async(*args: Any, **kwargs: Any) -> Any:
                    before = time.thread_time()
                    try:
                        return await function(*args, **kwargs)
                    finally:
                        steps[label] += time.thread_time() - before

                return timed_async

            @functools.wraps(function)
            def timed(*args: Any, **kwargs: Any) -> Any:
                before = time.thread_time()
                try:
                    return function(*args, **kwargs)
                finally:
                    steps[label] += time.thread_time() - before

            return timed

        replacement = make(function, label)
        if isinstance(original, classmethod):
            replacement = classmethod(replacement)
        elif isinstance(original, staticmethod):
            replacement = staticmethod(replacement)
        setattr(owner, name, replacement)


async def _assistant(runtime: Runtime) -> str:
    async with runtime.transaction() as session:
        made = await assistants.create(session, _PROJECT, AssistantCreate.model_validate({"model": "gpt-4o"}))
        return made.id


async def _create(runtime: Runtime, body: ThreadAndRunCreate) -> orm.Run:
    """A new thread and run reserved for OWNER, committed as the API commits it."""
    reservation = run_execution.Reservation(run_execution.reserved_for(OWNER), time.time() + 600)
    async with runtime.transaction() as session:
        _thread, run, events = await runs.create_thread_and_run(
            session, _PROJECT, body, expires_in=600, reservation=reservation, remembered=False
        )
        await runtime.run_log.append(session, run.id, events, run_locked=True)
    return run


_CALLGRIND_C = """
#include <valgrind/callgrind.h>
void start(void) { CALLGRIND_START_INSTRUMENTATION; }
void toggle(void) { CALLGRIND_TOGGLE_COLLECT; }
"""


def _callgrind() -> Any:
    """callgrind's client requests (no-ops outside valgrind), built here."""
    import ctypes
    import shutil
    import subprocess

    scratch = Path(tempfile.mkdtemp(prefix="answer-cpu-cg-"))
    (scratch / "cg.c").write_text(_CALLGRIND_C)
    compiler = shutil.which("cc")
    if compiler is None:
        raise SystemExit("--callgrind needs a C compiler (cc) and valgrind's headers")
    subprocess.run(
        [compiler, "-O1", "-shared", "-fPIC", "-o", str(scratch / "cg.so"), str(scratch / "cg.c")], check=True
    )
    return ctypes.CDLL(str(scratch / "cg.so"))


def _as_a_provider(runtime: Runtime) -> None:
    """The model answers as a provider's does (never at once): streamed."""

    async def not_at_once(_request: llm.ChatRequest) -> None:
        return None

    async def stream(_request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        for word in ("Hello", " there,", " how", " are", " you?"):
            yield llm.TextDelta(word)
        yield llm.Finish("stop", llm.Usage(10, 5))

    runtime.llm.answer_at_once = not_at_once  # type: ignore[method-assign]
    runtime.llm.stream = stream  # type: ignore[method-assign]


async def _through_create(runtime: Runtime, body: ThreadAndRunCreate) -> str:
    """One run through the API's create (api/runs.py's _queue_run, as
    POST /threads/runs answered as JSON), with this process's worker as the
    server's (run_forever's hand-offs, no tick), to its end: the create, the
    hand-off (or, where the branch folds it, the create's start) and the
    run. A run the worker does not hand is claimed by a tick here."""
    from app.api import runs as api_runs

    made: list[str] = []

    async def change(session: Any, unwritten: Any) -> Any:
        _thread, run, events = await runs.create_thread_and_run(
            session,
            _PROJECT,
            body,
            expires_in=600,
            reservation=runtime.run_reservation(),
            remembered=True,
            unwritten=unwritten,
        )
        made.append(run.id)
        return run, events

    await api_runs._queue_run(runtime, False, change)
    worker = runtime.worker
    assert worker is not None
    await worker._handed()
    if worker._tasks:
        await asyncio.gather(*worker._tasks.values())
    else:
        await worker.run_until_idle()
    return made[-1]


async def _round(
    runtime: Runtime,
    body: ThreadAndRunCreate,
    count: int,
    profiler: cProfile.Profile | None,
    callgrind: Any = None,
    provider: bool = False,
    through_create: bool = False,
) -> list[float]:
    """``count`` runs created and handed one at a time: each hand-off's loop CPU, in ms."""
    cpu: list[float] = []
    for _ in range(count):
        if through_create:  # the create counted too: where a branch moves work between it and the hand-off
            if profiler is not None:
                profiler.enable()
            if callgrind is not None:
                callgrind.toggle()
            before = time.thread_time()
            run_id = await _through_create(runtime, body)
            cpu.append((time.thread_time() - before) * 1000)
            if callgrind is not None:
                callgrind.toggle()
            if profiler is not None:
                profiler.disable()
            async with runtime.transaction() as session:
                run = await session.get(orm.Run, run_id)
                assert run is not None and run.status == "completed", "the run completed"
            continue
        created = await _create(runtime, body)
        if profiler is not None:
            profiler.enable()
        if callgrind is not None:
            callgrind.toggle()  # this thread's instructions counted from here
        before = time.thread_time()
        execution = await execute.hand_off(runtime, OWNER, created, 600.0, {})
        finished = execution.finished
        if not finished:  # --provider: the streamed answer and its end
            await execute.run(execution)
        cpu.append((time.thread_time() - before) * 1000)
        if callgrind is not None:
            callgrind.toggle()
        if profiler is not None:
            profiler.disable()
        assert finished or provider, "the offline model's answer is instant"
        if not finished:
            async with runtime.transaction() as session:
                run = await session.get(orm.Run, created.id)
                assert run is not None and run.status == "completed", "the provider's run completed"
    return cpu


async def _bench(args: argparse.Namespace, url: str, data: Path) -> None:
    runtime = await Runtime.start(Settings(data_dir=data, database_url=url))
    if args.provider:
        _as_a_provider(runtime)
    if args.through_create:
        from app.worker import Worker

        if args.provider:
            runtime.llm.streams = lambda _model: True  # type: ignore[method-assign]  # as a provider's route
        worker = Worker(runtime)
        runtime.attach_worker(worker)
        worker._looping = True  # as while run_forever() goes round: it hands runs only then
    try:
        assistant_id = await _assistant(runtime)
        body = ThreadAndRunCreate.model_validate(
            {"assistant_id": assistant_id, "thread": {"messages": [{"role": "user", "content": "hello there"}]}}
        )
        await _round(runtime, body, args.warmup, None, provider=args.provider, through_create=args.through_create)
        steps: dict[str, float] = {}
        if args.breakdown:
            _timing(steps)
        profiler = cProfile.Profile() if args.profile else None
        callgrind = _callgrind() if args.callgrind else None
        if callgrind is not None:
            callgrind.start()
        for index in range(args.rounds):
            cpu = await _round(
                runtime,
                body,
                args.runs,
                profiler,
                callgrind,
                provider=args.provider,
                through_create=args.through_create,
            )
            if cpu:
                cpu.sort()
                print(
                    f"round {index + 1}: {len(cpu)} hand-offs, loop CPU ms p50 {statistics.median(cpu):.3f}"
                    f" p10 {cpu[len(cpu) // 10]:.3f} mean {statistics.fmean(cpu):.3f}",
                    flush=True,
                )
        if profiler is not None:
            profiler.dump_stats(args.profile)
        total_runs = args.runs * args.rounds
        for label, seconds in steps.items():
            print(f"{label:45} {seconds * 1e6 / total_runs:8.1f} us/run")
    finally:
        if runtime.worker is not None:
            await runtime.worker.stop()
        await runtime.close()


def _on_server_loop(work: Coroutine[Any, Any, None]) -> None:
    """``work`` on the loop the server runs (uvloop when installed)."""
    if Settings().resolved_event_loop() == "uvloop":
        import uvloop

        uvloop.run(work)
    else:
        asyncio.run(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--profile", help="write cProfile stats of the hand-offs here")
    parser.add_argument("--breakdown", action="store_true", help="loop CPU of each of _STEPS per run")
    parser.add_argument("--callgrind", action="store_true", help="under valgrind: count the hand-offs only")
    parser.add_argument("--provider", action="store_true", help="answered as a provider answers: streamed")
    parser.add_argument(
        "--through-create",
        action="store_true",
        help="count the API's create too, with a worker attached as the server's (its hand-off or its fold)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="answer-cpu-") as scratch:
        root = Path(scratch)
        if args.db == "sqlite":
            _on_server_loop(_bench(args, f"sqlite+aiosqlite:///{root / 'bench.db'}", root / "data"))
            return
        import runs as base

        with base.postgres_url(root) as (url, _postmaster):
            _on_server_loop(_bench(args, url, root / "data"))


if __name__ == "__main__":
    main()
