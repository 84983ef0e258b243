"""Races through the official SDK, with real concurrency (issue 10): dozens of
simultaneous requests per trial, many trials, on SQLite and PostgreSQL.

The thread lock (one live run, no new messages while it lives) is kept by the
database; a request that loses a race to another request or to the worker
answers what OpenAI answers (a 400 with its text), never a 500.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import openai
import pytest
from fastapi import FastAPI
from openai.types.beta.threads import Run
from sqlalchemy import text, update

from app import ids, orm
from app.settings import Settings
from app.worker import Worker

T = TypeVar("T")

FUNCTION_F = {"type": "function", "function": {"name": "f"}}
TERMINAL = {"cancelled", "failed", "completed", "incomplete", "expired"}


@pytest.fixture
def no_worker(settings: Settings) -> Settings:
    """Runs stay where the test leaves them (request this before `client`)."""
    settings.embedded_worker = False
    return settings


@dataclass
class Outcomes:
    """What a batch of concurrent requests answered: successes and the
    messages of 400s. Anything else (a 500, a 409) fails the test at once."""

    ok: list[Any] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


async def concurrently(calls: Sequence[Awaitable[Any]]) -> Outcomes:
    outcomes = Outcomes()
    for result in await asyncio.gather(*calls, return_exceptions=True):
        if isinstance(result, openai.BadRequestError):
            outcomes.refused.append(result.body["message"])  # type: ignore[index]
        elif isinstance(result, BaseException):
            raise result
        else:
            outcomes.ok.append(result)
    return outcomes


async def _assistant(client: openai.AsyncOpenAI, **kwargs: Any) -> str:
    return (await client.beta.assistants.create(model="gpt-4o", **kwargs)).id


async def _terminal(client: openai.AsyncOpenAI, run: Run) -> Run:
    """Poll until the run has ended (bounded by the test timeout)."""
    while run.status not in TERMINAL:
        await asyncio.sleep(0.005)
        run = await client.beta.threads.runs.retrieve(run.id, thread_id=run.thread_id)
    return run


async def test_concurrent_run_creates_accept_exactly_one(no_worker: Settings, client: openai.AsyncOpenAI) -> None:
    assistant_id = await _assistant(client)
    for _trial in range(6):
        thread = await client.beta.threads.create(messages=[{"role": "user", "content": "hi"}])
        creates = [client.beta.threads.runs.create(thread.id, assistant_id=assistant_id) for _ in range(20)]
        outcomes = await concurrently(creates)
        assert len(outcomes.ok) == 1, outcomes.refused
        winner = outcomes.ok[0]
        assert outcomes.refused == [f"Thread {thread.id} already has an active run {winner.id}."] * 19
        listed = await client.beta.threads.runs.list(thread.id)
        assert [run.id for run in listed.data] == [winner.id]


async def test_messages_never_join_a_live_run(no_worker: Settings, client: openai.AsyncOpenAI) -> None:
    assistant_id = await _assistant(client)
    refused_in_all = 0
    for trial in range(6):
        thread = await client.beta.threads.create()
        calls: list[Awaitable[Any]] = [
            client.beta.threads.messages.create(thread.id, role="user", content=f"m{i}") for i in range(16)
        ]
        calls.insert(4 + trial, client.beta.threads.runs.create(thread.id, assistant_id=assistant_id))
        outcomes = await concurrently(calls)
        [run] = [item for item in outcomes.ok if item.object == "thread.run"]
        accepted = [item for item in outcomes.ok if item.object == "thread.message"]
        assert outcomes.refused == [f"Can't add messages to {thread.id} while a run {run.id} is active."] * (
            16 - len(accepted)
        )
        # Every accepted message was written before the run: ids carry the
        # order in which they were made, under the thread lock.
        run_seq = ids.seq_of(ids.RUN, run.id)
        assert run_seq is not None
        assert all((ids.seq_of(ids.MESSAGE, message.id) or 0) < run_seq for message in accepted)
        listed = await client.beta.threads.messages.list(thread.id, limit=100)
        assert sorted(message.id for message in listed.data) == sorted(message.id for message in accepted)
        refused_in_all += len(outcomes.refused)
    assert refused_in_all > 0  # the race really took place


async def test_live_run_index_refuses_what_a_check_missed(
    no_worker: Settings, client: openai.AsyncOpenAI, app: FastAPI, database_url: str
) -> None:
    """A live run inserted by a writer that skipped the thread lock (another
    replica's bug, a manual fix): a run create that raced it still gets the
    400. On PostgreSQL the create passes the check and meets the unique index;
    on SQLite it waits for the writer, then meets the check."""
    runtime = app.state.runtime
    assistant_id = await _assistant(client)
    for _trial in range(3):
        thread = await client.beta.threads.create()
        seq = ids.next_seq()
        rogue = orm.Run(
            id=ids.new_id(ids.RUN, seq),
            seq=seq,
            created_at=ids.seconds(seq),
            thread_id=thread.id,
            assistant_id=assistant_id,
            status="queued",
            model="gpt-4o",
            instructions="",
            tools=[],
            metadata_={},
        )
        async with runtime.sessionmaker() as session, session.begin():
            session.add(rogue)
            await session.flush()
            create = asyncio.create_task(client.beta.threads.runs.create(thread.id, assistant_id=assistant_id))
            await _until_blocked(session, database_url, create)
        outcome = await concurrently([create])
        assert outcome.refused == [f"Thread {thread.id} already has an active run {rogue.id}."]


async def _until_blocked(session: Any, database_url: str, request: asyncio.Task[Any]) -> None:
    """Return once ``request`` waits on the lock held by ``session``'s
    transaction (PostgreSQL shows it in pg_stat_activity); SQLite cannot show
    it, so there the lock is simply held a moment."""
    if database_url.startswith("sqlite"):
        await asyncio.sleep(0.2)
        assert not request.done()
        return
    query = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
    while True:
        # Statistics views are a snapshot per transaction unless cleared.
        await session.execute(text("SELECT pg_stat_clear_snapshot()"))
        if (await session.execute(text(query))).scalar():
            return
        assert not request.done()
        await asyncio.sleep(0.005)


async def test_cancels_racing_the_worker(client: openai.AsyncOpenAI) -> None:
    """Cancel at once after creating, twice at the same time, while the
    worker starts and finishes the runs: 200 ``cancelling`` or the 400 that
    names the status the run had reached, and the final status agrees."""
    assistant_id = await _assistant(client)

    async def create_and_cancel(content: str) -> tuple[Run, Outcomes]:
        run = await client.beta.threads.create_and_run(
            assistant_id=assistant_id, thread={"messages": [{"role": "user", "content": content}]}
        )
        cancels = [client.beta.threads.runs.cancel(run.id, thread_id=run.thread_id) for _ in range(2)]
        return run, await concurrently(cancels)

    contents = ["[[reply done]]", "[[delay 1]] [[tokens 4]]", "[[tokens 2]]"]
    answered_200 = 0
    for _trial in range(4):
        batch = [create_and_cancel(contents[i % len(contents)]) for i in range(16)]
        for run, outcomes in await asyncio.gather(*batch):
            final = await _terminal(client, run)
            assert len(outcomes.ok) <= 1
            for answer in outcomes.ok:
                assert answer.status == "cancelling"
                assert final.status == "cancelled"
            for message in outcomes.refused:
                assert message in {f"Cannot cancel run with status '{s}'." for s in ("cancelling", final.status)}
            answered_200 += len(outcomes.ok)
    assert answered_200 > 0


async def _requires_action(client: openai.AsyncOpenAI, assistant_id: str) -> Run:
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "[[call f]]"}])
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant_id)
    assert run.status == "requires_action" and run.required_action is not None
    return run


def _outputs(run: Run, text: str) -> list[Any]:
    assert run.required_action is not None
    return [{"tool_call_id": c.id, "output": text} for c in run.required_action.submit_tool_outputs.tool_calls]


async def test_concurrent_submits_accept_exactly_one(client: openai.AsyncOpenAI) -> None:
    assistant_id = await _assistant(client, tools=[FUNCTION_F])

    async def trial() -> None:
        run = await _requires_action(client, assistant_id)
        submits = [
            client.beta.threads.runs.submit_tool_outputs(
                run.id, thread_id=run.thread_id, tool_outputs=_outputs(run, f"out{i}")
            )
            for i in range(10)
        ]
        outcomes = await concurrently(submits)
        assert len(outcomes.ok) == 1 and outcomes.ok[0].status == "queued"
        allowed = {f'Runs in status "{s}" do not accept tool outputs.' for s in ("queued", "in_progress", "completed")}
        assert len(outcomes.refused) == 9 and set(outcomes.refused) <= allowed
        final = await _terminal(client, run)
        assert final.status == "completed"
        steps = await client.beta.threads.runs.steps.list(run.id, thread_id=run.thread_id)
        [tool_step] = [step for step in steps.data if step.type == "tool_calls"]
        [call] = tool_step.step_details.tool_calls  # type: ignore[union-attr]
        assert call.function.output.startswith("out")  # type: ignore[union-attr]
        replies = await client.beta.threads.messages.list(run.thread_id, run_id=run.id)
        assert len(replies.data) == 1

    await asyncio.gather(*(trial() for _ in range(6)))


async def test_submits_racing_cancels(client: openai.AsyncOpenAI) -> None:
    assistant_id = await _assistant(client, tools=[FUNCTION_F])

    async def trial() -> None:
        run = await _requires_action(client, assistant_id)
        calls: list[Awaitable[Any]] = []
        for i in range(5):
            calls.append(
                client.beta.threads.runs.submit_tool_outputs(
                    run.id, thread_id=run.thread_id, tool_outputs=_outputs(run, f"out{i}")
                )
            )
            calls.append(client.beta.threads.runs.cancel(run.id, thread_id=run.thread_id))
        outcomes = await concurrently(calls)
        final = await _terminal(client, run)
        submitted = [item for item in outcomes.ok if item.status == "queued"]
        cancelling = [item for item in outcomes.ok if item.status == "cancelling"]
        assert len(submitted) <= 1 and len(cancelling) <= 1 and len(outcomes.ok) == len(submitted) + len(cancelling)
        assert final.status == ("cancelled" if cancelling else "completed")
        for message in outcomes.refused:
            assert message.startswith(("Runs in status ", "Cannot cancel run with status "))

    await asyncio.gather(*(trial() for _ in range(6)))


async def test_submits_racing_expiry(client: openai.AsyncOpenAI, app: FastAPI) -> None:
    """The run's time is up while outputs arrive and the reaper sweeps: every
    submit answers the expired 400, and the run ends expired."""
    runtime = app.state.runtime
    assistant_id = await _assistant(client, tools=[FUNCTION_F])
    waiting = await asyncio.gather(*(_requires_action(client, assistant_id) for _ in range(4)))
    async with runtime.transaction() as session:
        await session.execute(
            update(orm.Run).where(orm.Run.id.in_([run.id for run in waiting])).values(expires_at=ids.now() - 1)
        )
    reaper = Worker(runtime)
    calls: list[Awaitable[Any]] = [reaper.reap()]
    for run in waiting:
        outputs = _outputs(run, "x")
        submit = client.beta.threads.runs.submit_tool_outputs
        calls += [submit(run.id, thread_id=run.thread_id, tool_outputs=outputs) for _ in range(5)]
    outcomes = await concurrently(calls)
    assert outcomes.ok == [None]  # the reaper's return
    assert outcomes.refused == ['Runs in status "expired" do not accept tool outputs.'] * 20
    for run in waiting:
        assert (await _terminal(client, run)).status == "expired"
