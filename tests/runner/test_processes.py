"""Standalone `worker` processes killed and stopped mid-run (issue 10): a run
whose worker died is resumed by another worker from its last committed step,
with no duplicated message, step or usage; SIGTERM drains and hands the rest
over at once."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app import orm
from app.runtime import Runtime
from app.settings import Settings
from tests.runner.test_worker import _make_runs, _statuses
from tests.test_cli import (
    REPO_ROOT,
    STOP_TIMEOUT,
    _poll_run,
    clean_env,
    free_port,
    running_server,
)

DEADLINE = 60.0
FINAL = {"completed", "failed", "cancelled", "expired", "incomplete"}
# 100 tokens, 20 ms apart: about 2 s of answer, long enough to interrupt.
SLOW = "[[delay 20]] [[tokens 100]]"


@contextmanager
def worker_process(tmp_path: Path, runtime: Runtime, name: str, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m app worker`` on the test's database; killed on the way out."""
    settings = runtime.settings
    command = [sys.executable, "-m", "app", "worker", "--database-url", settings.resolved_database_url()]
    command += ["--data-dir", str(settings.data_dir)]
    extra = {"ASSISTANTS_WORKER_POLL_SECONDS": "0.05", **env}
    with (tmp_path / f"{name}.log").open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=clean_env(**extra), stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)


async def _until_async(check: object, what: str) -> None:
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        if await check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


async def _streaming(runtime: Runtime, run_ids: list[str]) -> bool:
    """Every run has an answer being written (the model call is under way)."""
    async with runtime.transaction() as session:
        count = await session.scalar(
            select(func.count(orm.Message.id)).where(
                orm.Message.run_id.in_(run_ids), orm.Message.status == "in_progress"
            )
        )
    return count == len(run_ids)


async def _final(runtime: Runtime, run_ids: list[str]) -> bool:
    return set((await _statuses(runtime, run_ids)).values()) <= FINAL


async def _assert_answered_once(runtime: Runtime, run_ids: list[str], started: dict[str, int | None]) -> None:
    async with runtime.transaction() as session:
        for run_id in run_ids:
            run = await session.get(orm.Run, run_id)
            assert run is not None and run.status == "completed", (run_id, run and run.last_error)
            answers = (await session.scalars(select(orm.Message).where(orm.Message.run_id == run_id))).all()
            steps = (await session.scalars(select(orm.RunStep).where(orm.RunStep.run_id == run_id))).all()
            assert [(m.status, len(m.content[0]["text"]["value"].split())) for m in answers] == [("completed", 100)]
            assert [(s.type, s.status) for s in steps] == [("message_creation", "completed")]
            assert run.usage is not None and run.usage["completion_tokens"] == 100
            assert run.started_at == started[run_id]  # as if nothing happened


async def _started_at(runtime: Runtime, run_ids: list[str]) -> dict[str, int | None]:
    async with runtime.transaction() as session:
        rows = (await session.execute(select(orm.Run.id, orm.Run.started_at).where(orm.Run.id.in_(run_ids)))).all()
    return {row.id: row.started_at for row in rows}


async def test_kill_9_worker_mid_run_another_worker_resumes(tmp_path: Path, runtime: Runtime) -> None:
    run_ids = await _make_runs(runtime, 4, text=SLOW)
    with worker_process(tmp_path, runtime, "doomed", ASSISTANTS_RUN_LEASE_SECONDS="1") as doomed:
        await _until_async(lambda: _streaming(runtime, run_ids), "every run to be answering")
        started = await _started_at(runtime, run_ids)
        doomed.kill()  # SIGKILL: no shutdown code runs
        doomed.wait(timeout=STOP_TIMEOUT)
    assert set((await _statuses(runtime, run_ids)).values()) == {"in_progress"}
    with worker_process(tmp_path, runtime, "survivor", ASSISTANTS_RUN_LEASE_SECONDS="1") as survivor:
        await _until_async(lambda: _final(runtime, run_ids), "the runs to finish elsewhere")
        survivor.send_signal(signal.SIGTERM)
        assert survivor.wait(timeout=STOP_TIMEOUT) == 0
    await _assert_answered_once(runtime, run_ids, started)


async def test_sigterm_releases_runs_in_flight_for_another_worker(tmp_path: Path, runtime: Runtime) -> None:
    run_ids = await _make_runs(runtime, 3, text=SLOW)
    # A 10-minute lease: only an explicit release lets another worker take over.
    slow_lease = {"ASSISTANTS_RUN_LEASE_SECONDS": "600", "ASSISTANTS_WORKER_DRAIN_SECONDS": "0.2"}
    with worker_process(tmp_path, runtime, "stopping", **slow_lease) as stopping:
        await _until_async(lambda: _streaming(runtime, run_ids), "every run to be answering")
        started = await _started_at(runtime, run_ids)
        stopping.send_signal(signal.SIGTERM)
        assert stopping.wait(timeout=STOP_TIMEOUT) == 0
    log = (tmp_path / "stopping.log").read_text()
    assert "released 3 runs for another worker to resume" in log, log
    async with runtime.transaction() as session:
        leases = (
            await session.execute(select(orm.Run.status, orm.Run.lease_owner).where(orm.Run.id.in_(run_ids)))
        ).all()
    assert [tuple(row) for row in leases] == [("in_progress", None)] * 3
    with worker_process(tmp_path, runtime, "successor", **slow_lease) as successor:
        await _until_async(lambda: _final(runtime, run_ids), "the runs to finish elsewhere")
        successor.send_signal(signal.SIGTERM)
        assert successor.wait(timeout=STOP_TIMEOUT) == 0
    await _assert_answered_once(runtime, run_ids, started)


def test_serve_sigterm_hands_in_flight_runs_to_the_next_start(tmp_path: Path, settings: Settings) -> None:
    port = free_port()
    args = ["--port", str(port), "--data-dir", str(tmp_path / "data")]
    args += ["--database-url", settings.resolved_database_url()]
    # A 10-minute lease: only the release at shutdown lets the next start resume the run at once.
    env = clean_env(ASSISTANTS_RUN_LEASE_SECONDS="600", ASSISTANTS_WORKER_DRAIN_SECONDS="0.2")
    with running_server(tmp_path, *args, port=port, env=env) as server:
        sdk = server.sdk()
        assistant = sdk.beta.assistants.create(model="gpt-4o")
        run = sdk.beta.threads.create_and_run(
            assistant_id=assistant.id, thread={"messages": [{"role": "user", "content": "[[delay 50]] [[tokens 100]]"}]}
        )
        started = _poll_run(sdk, run.thread_id, run.id, {"in_progress"})
        assert server.terminate() == 0, server.log()
        assert "released 1 runs for another worker to resume" in server.log()
    with running_server(tmp_path, *args, port=port, env=env) as server:
        sdk = server.sdk()
        done = _poll_run(sdk, run.thread_id, run.id, FINAL)
        assert done.status == "completed", done.last_error
        assert done.started_at == started.started_at and done.usage is not None and done.usage.completion_tokens == 100
        answers = [m for m in sdk.beta.threads.messages.list(run.thread_id).data if m.role == "assistant"]
        assert len(answers) == 1 and len(answers[0].content[0].text.value.split()) == 100  # type: ignore[union-attr]
        assert server.terminate() == 0, server.log()


def test_kill_9_after_a_tool_round_resumes_from_the_round(tmp_path: Path, settings: Settings) -> None:
    port = free_port()
    args = ["--port", str(port), "--data-dir", str(tmp_path / "data")]
    args += ["--database-url", settings.resolved_database_url()]
    env = clean_env(ASSISTANTS_RUN_LEASE_SECONDS="1", ASSISTANTS_WORKER_POLL_SECONDS="0.1")
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
    with running_server(tmp_path, *args, port=port, env=env) as server:
        sdk = server.sdk()
        assistant = sdk.beta.assistants.create(model="gpt-4o", tools=[tool])  # type: ignore[list-item]
        script = "[[call lookup]] [[then]] [[delay 20]] [[tokens 100]]"
        run = sdk.beta.threads.create_and_run(
            assistant_id=assistant.id, thread={"messages": [{"role": "user", "content": script}]}
        )
        waiting = _poll_run(sdk, run.thread_id, run.id, {"requires_action"})
        assert waiting.required_action is not None
        (call,) = waiting.required_action.submit_tool_outputs.tool_calls
        sdk.beta.threads.runs.submit_tool_outputs(
            run.id, thread_id=run.thread_id, tool_outputs=[{"tool_call_id": call.id, "output": "42"}]
        )
        deadline = time.monotonic() + DEADLINE
        while not any(m.status == "in_progress" for m in sdk.beta.threads.messages.list(run.thread_id).data):
            assert time.monotonic() < deadline, "the second model call never started"
            time.sleep(0.02)
        first_usage = waiting.usage
        server.process.kill()
        server.process.wait(timeout=STOP_TIMEOUT)
    with running_server(tmp_path, *args, port=port, env=env) as server:
        sdk = server.sdk()
        done = _poll_run(sdk, run.thread_id, run.id, FINAL)
        assert done.status == "completed", done.last_error
        steps = sdk.beta.threads.runs.steps.list(run.id, thread_id=run.thread_id, order="asc").data
        assert [(s.type, s.status) for s in steps] == [("tool_calls", "completed"), ("message_creation", "completed")]
        assert steps[0].step_details.tool_calls[0].id == call.id  # type: ignore[union-attr]
        answers = [m for m in sdk.beta.threads.messages.list(run.thread_id).data if m.role == "assistant"]
        assert len(answers) == 1 and len(answers[0].content[0].text.value.split()) == 100  # type: ignore[union-attr]
        assert first_usage is not None and done.usage is not None
        assert done.usage.completion_tokens == first_usage.completion_tokens + 100
        assert server.terminate() == 0, server.log()
