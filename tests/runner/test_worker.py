"""The worker and the state machine against the database, without HTTP:
the transition table, compare-and-set, claim races, lapsed leases, expiry."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sqlalchemy import select, update

from app import ids, orm
from app.runtime import Runtime
from app.services import run_state, run_steps
from app.worker import INTERRUPTED, Worker


def user_message(thread_id: str, content: list[dict[str, Any]]) -> orm.Message:
    """A completed user message of the thread, as the API would write it."""
    seq = ids.next_seq()
    return orm.Message(
        id=ids.new_id(ids.MESSAGE, seq),
        seq=seq,
        created_at=ids.seconds(seq),
        thread_id=thread_id,
        role="user",
        content=content,
        status="completed",
        metadata_={},
    )


async def _make_runs(runtime: Runtime, count: int, status: str = "queued", text: str = "hi") -> list[str]:
    """Threads with one message and one run each, inserted directly."""
    run_ids = []
    async with runtime.transaction() as session:
        seq = ids.next_seq()
        assistant = orm.Assistant(
            id=ids.new_id(ids.ASSISTANT, seq),
            project_id=orm.DEFAULT_PROJECT_ID,
            seq=seq,
            created_at=ids.seconds(seq),
            model="m",
            tools=[],
            metadata_={},
        )
        session.add(assistant)
        for _ in range(count):
            seq = ids.next_seq()
            thread = orm.Thread(
                id=ids.new_id(ids.THREAD, seq),
                project_id=orm.DEFAULT_PROJECT_ID,
                seq=seq,
                created_at=ids.seconds(seq),
                metadata_={},
            )
            session.add(thread)
            await session.flush()  # children reference it
            session.add(user_message(thread.id, [{"type": "text", "text": {"value": text, "annotations": []}}]))
            seq = ids.next_seq()
            run = orm.Run(
                id=ids.new_id(ids.RUN, seq),
                seq=seq,
                created_at=ids.seconds(seq),
                thread_id=thread.id,
                assistant_id=assistant.id,
                status=status,
                expires_at=ids.seconds(seq) + 600,
                model="m",
                instructions="",
                tools=[],
                metadata_={},
                parallel_tool_calls=True,
            )
            session.add(run)
            run_ids.append(run.id)
    return run_ids


async def _statuses(runtime: Runtime, run_ids: list[str]) -> dict[str, str]:
    async with runtime.transaction() as session:
        rows = (await session.execute(select(orm.Run.id, orm.Run.status).where(orm.Run.id.in_(run_ids)))).all()
    return {row.id: row.status for row in rows}


def test_transition_table_is_closed() -> None:
    for source, targets in run_state.ALLOWED.items():
        assert source in run_state.LIVE
        assert targets <= run_state.LIVE | run_state.TERMINAL
    assert not (run_state.TERMINAL & set(run_state.ALLOWED))


async def test_transition_is_compare_and_set(runtime: Runtime) -> None:
    (run_id,) = await _make_runs(runtime, 1)
    async with runtime.transaction() as session:
        first = await session.get(orm.Run, run_id)
    async with runtime.transaction() as session:
        second = await session.get(orm.Run, run_id)
        assert second is not None
        await run_state.transition(session, second, "in_progress")
    assert first is not None
    async with runtime.transaction() as session:
        with pytest.raises(run_state.TransitionConflict):
            await run_state.transition(session, first, "cancelling")  # stale: it is in_progress now
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
        assert run is not None and run.status == "in_progress" and run.started_at is not None
        with pytest.raises(run_state.InvalidTransition):
            await run_state.transition(session, run, "queued")


async def test_concurrent_workers_never_claim_the_same_run(runtime: Runtime) -> None:
    run_ids = await _make_runs(runtime, 40)
    workers = [Worker(runtime, concurrency=40) for _ in range(4)]
    claims = await asyncio.gather(*(worker.claim(15) for worker in workers))
    claimed = [run_id for batch in claims for run_id in batch]
    assert len(claimed) == len(set(claimed)) == 40
    assert set(claimed) == set(run_ids)
    assert await asyncio.gather(*(worker.claim(10) for worker in workers)) == [[], [], [], []]


async def test_a_claim_takes_no_more_runs_than_its_limit(runtime: Runtime) -> None:
    # PostgreSQL once rescanned the candidates per updated row and took them all.
    run_ids = await _make_runs(runtime, 8)
    worker = Worker(runtime, concurrency=8)
    claims = [await worker.claim(limit) for limit in (1, 2, 3, 5)]
    assert [set(claim) for claim in claims] == [
        set(run_ids[:1]),
        set(run_ids[1:3]),
        set(run_ids[3:6]),
        set(run_ids[6:]),
    ]


async def test_workers_execute_everything_exactly_once(runtime: Runtime) -> None:
    run_ids = await _make_runs(runtime, 20)
    workers = [Worker(runtime, concurrency=4) for _ in range(3)]
    await asyncio.gather(*(worker.run_until_idle() for worker in workers))
    assert set((await _statuses(runtime, run_ids)).values()) == {"completed"}
    async with runtime.transaction() as session:
        answers = (await session.scalars(select(orm.Message.run_id).where(orm.Message.role == "assistant"))).all()
    assert sorted(answers) == sorted(run_ids)  # one answer per run, never two


async def _interrupt(runtime: Runtime, run_id: str, *, expires_at: int | None = None) -> int:
    """Make ``run_id`` look like a run whose worker died mid-answer: in_progress,
    a lapsed lease and a half-written assistant message. Returns started_at."""
    started_at = ids.now() - 5
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
        assert run is not None
        run.status, run.started_at = "in_progress", started_at
        run.lease_owner, run.lease_expires_at = "dead-worker", time.time() - 1
        if expires_at is not None:
            run.expires_at = expires_at
        seq = ids.next_seq()
        session.add(
            orm.Message(
                id=ids.new_id(ids.MESSAGE, seq),
                seq=seq,
                created_at=ids.seconds(seq),
                thread_id=run.thread_id,
                role="assistant",
                content=[],
                status="in_progress",
                run_id=run.id,
                metadata_={},
            )
        )
        session.add(run_steps.new(run, "message_creation", {"type": "message_creation", "message_creation": {}}))
    return started_at


async def test_run_of_a_dead_worker_is_resumed_without_duplicates(runtime: Runtime) -> None:
    (run_id,) = await _make_runs(runtime, 1)
    started_at = await _interrupt(runtime, run_id)
    await Worker(runtime).run_until_idle()
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
        assert run is not None
        answers = (await session.scalars(select(orm.Message).where(orm.Message.run_id == run_id))).all()
        steps = (await session.scalars(select(orm.RunStep).where(orm.RunStep.run_id == run_id))).all()
    assert run.status == "completed" and run.last_error is None
    assert run.started_at == started_at and run.lease_owner is None
    assert [(m.status, m.content[0]["text"]["value"]) for m in answers] == [("completed", "You said: hi")]
    assert [(s.type, s.status) for s in steps] == [("message_creation", "completed")]
    assert run.usage is not None and run.usage["completion_tokens"] == steps[0].usage["completion_tokens"]  # type: ignore[index]


async def test_run_of_a_dead_worker_past_its_deadline_fails_and_keeps_completed_messages(runtime: Runtime) -> None:
    (run_id,) = await _make_runs(runtime, 1)
    await _interrupt(runtime, run_id, expires_at=ids.now() - 1)
    assert await Worker(runtime).claim(5) == []  # too late to resume
    await Worker(runtime).reap()
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
        messages = (await session.scalars(select(orm.Message).where(orm.Message.thread_id == run.thread_id))).all()  # type: ignore[union-attr]
    assert run is not None and run.status == "failed" and run.last_error == INTERRUPTED
    assert run.lease_owner is None
    assert [(m.role, m.status) for m in messages] == [("user", "completed"), ("assistant", "incomplete")]


async def test_live_lease_is_left_alone(runtime: Runtime) -> None:
    (run_id,) = await _make_runs(runtime, 1)
    async with runtime.transaction() as session:
        await session.execute(
            update(orm.Run)
            .where(orm.Run.id == run_id)
            .values(status="in_progress", lease_owner="other-worker", lease_expires_at=time.time() + 60)
        )
    await Worker(runtime).reap()
    assert await _statuses(runtime, [run_id]) == {run_id: "in_progress"}


async def test_queued_run_past_its_deadline_expires(runtime: Runtime) -> None:
    (run_id,) = await _make_runs(runtime, 1)
    async with runtime.transaction() as session:
        await session.execute(update(orm.Run).where(orm.Run.id == run_id).values(expires_at=ids.now() - 1))
    await Worker(runtime).reap()
    assert await _statuses(runtime, [run_id]) == {run_id: "expired"}
