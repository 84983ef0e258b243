"""The worker's claim of N runs and their starts, in process (issue 17).

Builds the real application (``create_app``, no worker: runs stay queued)
on a scratch database, creates runs through ASGI (``POST /v1/threads/runs``,
outside the measure), then claims and starts them ``--claim`` at a time
(``execute.claim_and_start``, as the worker's tick) with the model's answer
never instant (a provider's run: its start written in the claim, its answer
left to the execution, which is not run). Per round it prints the event
loop thread's CPU (``time.thread_time``) per claimed run, and the statements
the claims sent per run (the engine's ``before_cursor_execute``, which
``db.run_now`` tells as well; BEGIN and COMMIT are not cursor executions
and are not in it).

    .venv/bin/python bench/claim_cpu.py --db postgres --claim 7 --runs 700 --rounds 5

Run each tree's own copy (it serves the app of the tree it sits in).
Instructions, whatever the machine's load: with ``CREATE_CPU_CALLGRIND=1``
under ``valgrind --tool=callgrind --instr-atstart=no``, every round's
claims are counted (bench/create_cpu.py's switch), the creates not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this tree's app, not the installed one
import create_cpu
import overhead

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


async def _rounds(app: Any, claim: int, runs: int, rounds: int) -> list[tuple[float, float]]:
    from sqlalchemy import event

    from app.runner import execute

    runtime = app.state.runtime

    async def never_at_once(_request: Any) -> None:
        return None  # a provider's answer: streamed by the execution, not written in the claim

    runtime.llm.answer_at_once = never_at_once
    statements = 0

    def counted(*_args: Any) -> None:
        nonlocal statements
        statements += 1

    event.listen(runtime.engine.sync_engine, "before_cursor_execute", counted)
    data = await create_cpu._call(app, "POST", "/v1/assistants", {"model": "offline-bench", "instructions": "x"})
    assistant = json.loads(data)["id"]
    results = []
    for _round in range(rounds):
        for _ in range(runs):
            body = {**overhead._run_body("offline-bench", "hello there", False), "assistant_id": assistant}
            await create_cpu._call(app, "POST", "/v1/threads/runs", body)
        claimed, statements = 0, 0
        if create_cpu._UNDER_CALLGRIND:
            create_cpu._callgrind("--instr=on")
        started = time.thread_time()
        while claimed < runs:
            executions = await execute.claim_and_start(runtime, "bench:0:claim", claim, 600.0, {})
            assert executions and not any(execution.finished for execution in executions)
            claimed += len(executions)
        if create_cpu._UNDER_CALLGRIND:
            create_cpu._callgrind("--instr=off")
        results.append(((time.thread_time() - started) / claimed * 1000, statements / claimed))
    return results


async def _served(settings: Any, claim: int, runs: int, rounds: int) -> list[tuple[float, float]]:
    from app.__main__ import freeze_start_up_objects
    from app.main import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        freeze_start_up_objects()
        return await _rounds(app, claim, runs, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="postgres")
    parser.add_argument("--claim", type=int, default=7, help="runs a claim takes (7: pg16's 16-client mean)")
    parser.add_argument("--runs", type=int, default=700)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from app.__main__ import migrate
    from app.settings import Settings

    with tempfile.TemporaryDirectory(prefix="claim-cpu-") as name:
        scratch = Path(name)
        with overhead._database(args.db, scratch) as (url, _postmaster):
            (scratch / "data").mkdir()
            settings = Settings(data_dir=scratch / "data", database_url=url, embedded_worker=False, api_keys=[])
            assert migrate(settings) == 0
            results = asyncio.run(_served(settings, args.claim, args.runs, args.rounds))
    print(
        f"{args.db}, claims of {args.claim}: loop CPU ms per claimed run "
        + ", ".join(f"{cpu:.3f}" for cpu, _statements in results)
        + f" (best {min(cpu for cpu, _s in results):.3f}); statements per run "
        + ", ".join(f"{count:.2f}" for _cpu, count in results)
    )


if __name__ == "__main__":
    main()
