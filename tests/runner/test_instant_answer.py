"""An answer the model has whole at once (the offline model, uncued) is
written with the run's move in one transaction (issue 17), events in the
order a streamed answer gives them."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from app import ids, llm, orm
from app.llm import offline
from app.runner.execute import RunExecution
from app.runtime import Runtime
from app.services import model_requests, run_events, run_execution, run_state
from app.wire.events import Event
from app.worker import Worker
from tests.runner.test_worker import _make_runs, _statuses, user_message


@contextmanager
def statements_by_transaction(runtime: Runtime, engine: AsyncEngine | None = None) -> Iterator[list[tuple[int, str]]]:
    """Every statement sent while inside (on ``engine``, else the runtime's
    write engine), with a number telling its transaction (connections
    interleave; each BEGIN takes a new number)."""
    numbers = itertools.count()
    current: dict[Any, int] = {}
    seen: list[tuple[int, str]] = []

    def begin(connection: Any) -> None:
        current[connection] = next(numbers)

    def before(connection: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append((current.get(connection, -1), " ".join(statement.split())))

    engine = (engine or runtime.engine).sync_engine
    event.listen(engine, "begin", begin)
    event.listen(engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine, "begin", begin)
        event.remove(engine, "before_cursor_execute", before)


def _transactions_of(seen: list[tuple[int, str]], fragment: str) -> set[int]:
    return {number for number, statement in seen if fragment in statement}


# A run's events as its message is answered, in the order a stream gives them.
_ANSWERED = [
    "thread.run.in_progress",
    "thread.run.step.created",
    "thread.run.step.in_progress",
    "thread.message.created",
    "thread.message.in_progress",
    "thread.message.delta",
    "thread.message.completed",
]


async def _event_names(runtime: Runtime, run_id: str) -> list[str]:
    """The run's logged events in order, each series of deltas as one name."""
    async with runtime.transaction() as session:
        query = select(orm.RunEvent.event).where(orm.RunEvent.run_id == run_id).order_by(orm.RunEvent.seq)
        names = list((await session.scalars(query)).all())
    return [name for name, _series in itertools.groupby(names)]


async def test_an_instant_answer_and_the_runs_end_are_one_transaction(runtime: Runtime) -> None:
    (run_id,) = await _make_runs(runtime, 1)
    with statements_by_transaction(runtime) as seen:
        await Worker(runtime, concurrency=1).run_until_idle()
    inserts = _transactions_of(seen, "INSERT INTO messages") | _transactions_of(seen, "INSERT INTO run_steps")
    ending = [number for number, statement in seen if "UPDATE runs SET status" in statement][-1:]
    assert len(inserts) == 1 and list(inserts) == ending, seen
    # Claimed, started and ended in the claim's transaction.
    assert _transactions_of(seen, "UPDATE runs SET status") == inserts, seen
    assert await _event_names(runtime, run_id) == [*_ANSWERED, "thread.run.step.completed", "thread.run.completed"]


async def test_an_instant_function_call_requires_action_in_one_transaction(runtime: Runtime) -> None:
    # The offline model needs the function offered to call it.
    (run_id,) = await _make_runs(runtime, 1, text='[[reply Looking.]] [[call lookup {"q": "x"}]]')
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
        assert run is not None
        run.tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    with statements_by_transaction(runtime) as seen:
        await Worker(runtime, concurrency=1).run_until_idle()
    inserts = _transactions_of(seen, "INSERT INTO messages") | _transactions_of(seen, "INSERT INTO run_steps")
    ending = [number for number, statement in seen if "UPDATE runs SET status" in statement][-1:]
    assert len(inserts) == 1 and list(inserts) == ending, seen
    names = await _event_names(runtime, run_id)
    assert names[:7] == _ANSWERED
    assert names[7:] == [
        "thread.run.step.completed",
        "thread.run.step.created",
        "thread.run.step.in_progress",
        "thread.run.step.delta",
        "thread.run.requires_action",
    ]
    async with runtime.transaction() as session:
        steps = (await session.scalars(select(orm.RunStep).where(orm.RunStep.run_id == run_id))).all()
    by_type = {step.type: step for step in steps}
    assert by_type["tool_calls"].status == "in_progress"
    assert by_type["tool_calls"].step_details["tool_calls"][0]["function"]["name"] == "lookup"
    assert by_type["message_creation"].status == "completed"


async def test_a_scripted_rule_that_takes_time_answers_the_runs_its_times_allow(runtime: Runtime) -> None:
    """A rule with ``times`` whose answer takes time (not taken at once) is
    used once per run it answers: looking whether an answer can be taken at
    once counts no use (it did, and the run got the default answer)."""
    rule = runtime.llm.script.add({"respond": "Slowly, from the rule.", "delay_ms": 1, "times": 1})
    run_ids = await _make_runs(runtime, 2)
    await Worker(runtime, concurrency=1).run_until_idle()
    answers = []
    for run_id in run_ids:
        async with runtime.transaction() as session:
            message = await session.scalar(select(orm.Message).where(orm.Message.run_id == run_id))
        assert message is not None
        answers.append(message.content[0]["text"]["value"])
    assert answers[0] == "Slowly, from the rule." and answers[1] != answers[0]
    assert runtime.llm.script.used(rule.id) == 1


async def test_an_instant_answer_that_cannot_be_written_in_its_claim_fails_its_run_alone(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure writing an instant answer in the claim's transaction rolls
    the claim back; the run is then taken the streamed way, where the same
    failure fails it alone, and the other runs of the claim complete (it was
    claimed and failed again and again, holding them back)."""
    doomed, *others = await _make_runs(runtime, 3)
    real = RunExecution._after_turn

    async def after_turn(self: RunExecution, *args: Any) -> bool:
        if self.run_id == doomed:
            raise RuntimeError("the answer cannot be written")
        return await real(self, *args)

    monkeypatch.setattr(RunExecution, "_after_turn", after_turn)
    worker = Worker(runtime, concurrency=4)
    with pytest.raises(RuntimeError):
        await worker.run_until_idle()  # the claim, rolled back
    await worker.run_until_idle()
    async with runtime.transaction() as session:
        statuses = {run.id: run.status for run in await session.scalars(select(orm.Run))}
    assert statuses == {doomed: "failed", **{run_id: "completed" for run_id in others}}


@pytest.mark.parametrize("where", ["answer", "commit"])
async def test_a_data_error_writing_an_instant_answer_holds_no_claim_back(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A database error the data causes (an integrity error), writing an
    instant answer in its claim's transaction or at its COMMIT, comes back
    at every claim: the runs are then taken the streamed way, each in its own
    transactions (the claim failed again and again, no run of it moving)."""
    doomed, *others = await _make_runs(runtime, 3)
    refused = IntegrityError("INSERT INTO run_events", {}, Exception("a constraint refused it"))
    if where == "answer":
        real = RunExecution._after_turn

        async def after_turn(self: RunExecution, *args: Any) -> bool:
            if self.run_id == doomed and self._claim_session is not None:
                raise refused
            return await real(self, *args)

        monkeypatch.setattr(RunExecution, "_after_turn", after_turn)
    else:
        real_start = RunExecution.start_claimed

        async def start_claimed(self: RunExecution, session: Any, run: orm.Run, *args: Any) -> None:
            await real_start(self, session, run, *args)
            if self.finished and run.id == doomed:

                @event.listens_for(session.sync_session, "before_commit", once=True)
                def refuse(_session: Any) -> None:
                    raise refused

        monkeypatch.setattr(RunExecution, "start_claimed", start_claimed)
    worker = Worker(runtime, concurrency=4)
    with pytest.raises(IntegrityError):
        await worker.run_until_idle()  # the claim, rolled back
    await worker.run_until_idle()
    assert await _statuses(runtime, [doomed, *others]) == {run_id: "completed" for run_id in [doomed, *others]}


@pytest.mark.parametrize("refusal", ["data", "serialization"])
async def test_a_scripted_rule_answers_the_run_whose_claim_rolled_back(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, refusal: str
) -> None:
    """A rule with ``times: 1`` that answered a run at once in its claim,
    whose COMMIT then failed (a data error: the run is retried streamed; a
    serialization failure: retried as it was), answers that run again when
    it is retried, not a use more: it was counted when taken, the run then
    got the default answer and the rule answered no run at all."""
    rule = runtime.llm.script.add({"respond": "From the rule.", "times": 1})
    doomed, other = await _make_runs(runtime, 2)
    error: Exception = (
        IntegrityError("COMMIT", {}, Exception("a constraint refused it"))
        if refusal == "data"
        else OperationalError("COMMIT", {}, Exception("could not serialize access"))
    )
    real_start = RunExecution.start_claimed
    refused: list[str] = []

    async def start_claimed(self: RunExecution, session: Any, run: orm.Run, *args: Any) -> None:
        await real_start(self, session, run, *args)
        if self.finished and run.id == doomed and not refused:
            refused.append(run.id)  # the first claim only: the retry commits

            @event.listens_for(session.sync_session, "before_commit", once=True)
            def refuse(_session: Any) -> None:
                raise error

    monkeypatch.setattr(RunExecution, "start_claimed", start_claimed)
    worker = Worker(runtime, concurrency=4)
    with pytest.raises(type(error)):
        await worker.run_until_idle()  # the claim, rolled back
    async with asyncio.timeout(30):
        await worker.run_until_idle()
    answers = {}
    for run_id in (doomed, other):
        async with runtime.transaction() as session:
            message = await session.scalar(select(orm.Message).where(orm.Message.run_id == run_id))
        assert message is not None
        answers[run_id] = message.content[0]["text"]["value"]
    assert answers[doomed] == "From the rule." and answers[other] != "From the rule.", answers
    assert runtime.llm.script.used(rule.id) == 1


async def test_a_run_whose_answer_the_database_refuses_fails_alone(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer the database refuses wherever it is written (a DataError:
    PostgreSQL's JSON refuses a NUL character): after its claim, the run
    fails in its own transactions, the claim's other runs complete. As a
    database failure it was resumed again and again (the model asked again
    each time) until it expired."""
    doomed, *others = await _make_runs(runtime, 3)
    real = RunExecution._after_turn

    async def after_turn(self: RunExecution, *args: Any) -> bool:
        if self.run_id == doomed:
            raise DataError("INSERT INTO messages", {}, Exception("unsupported Unicode escape sequence"))
        return await real(self, *args)

    monkeypatch.setattr(RunExecution, "_after_turn", after_turn)
    worker = Worker(runtime, concurrency=4)
    with pytest.raises(DataError):
        await worker.run_until_idle()  # the claim, rolled back
    async with asyncio.timeout(30):
        await worker.run_until_idle()
    assert await _statuses(runtime, [doomed, *others]) == {
        doomed: "failed",
        **{run_id: "completed" for run_id in others},
    }


async def test_a_long_instant_answer_is_streamed(runtime: Runtime) -> None:
    """An answer longer than AT_ONCE_MOST_DELTAS is streamed as one from any
    model (its message opened in a transaction of its own, however fast it
    comes: execute.QUICK_ANSWER_MOST_EVENTS): built and written in one go it
    would hold the write lock (and the claim's other runs) meanwhile."""
    (run_id,) = await _make_runs(runtime, 1, text=f"[[tokens {offline.AT_ONCE_MOST_DELTAS + 1}]]")
    with statements_by_transaction(runtime) as seen:
        await Worker(runtime, concurrency=1).run_until_idle()
    opened = _transactions_of(seen, "INSERT INTO messages")
    ended = {number for number, statement in seen if "UPDATE runs SET status" in statement}
    assert opened and not opened & ended, seen
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
    assert run is not None and run.status == "completed"


async def test_a_run_answered_in_its_claim_is_moved_by_one_update(runtime: Runtime) -> None:
    """Its move to in_progress is held and written by its end's UPDATE
    (issue 17), which still compares and sets from the status the database
    has (queued) under the worker's lease; the run reads as a streamed one
    would (started, then completed)."""
    (run_id,) = await _make_runs(runtime, 1)
    with statements_by_transaction(runtime) as seen:
        await Worker(runtime, concurrency=1).run_until_idle()
    moves = [statement for _number, statement in seen if "UPDATE runs SET status" in statement]
    assert len(moves) == 1, seen
    assert "runs.status =" in moves[0] and "runs.lease_owner =" in moves[0]
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
    assert run is not None and run.status == "completed" and run.lease_owner is None
    assert run.started_at is not None and run.completed_at is not None and run.started_at <= run.completed_at
    names = await _event_names(runtime, run_id)
    assert names == [*_ANSWERED, "thread.run.step.completed", "thread.run.completed"]


async def test_a_run_streamed_after_its_claim_is_moved_to_in_progress_in_it(runtime: Runtime) -> None:
    """A run whose answer is not taken at once (cued to take time) has its
    held move written in the claim's transaction all the same: in_progress
    once the claim commits, before its answer. On PostgreSQL the move goes
    in the statement that logs its event (issue 17: a round trip fewer)."""
    (run_id,) = await _make_runs(runtime, 1, text="[[delay 1]] hello")
    with statements_by_transaction(runtime) as seen:
        await Worker(runtime, concurrency=1).run_until_idle()
    claim = _transactions_of(seen, "WITH candidates")
    started = _transactions_of(seen, "UPDATE runs SET status")
    assert min(claim) in started, seen  # (a later claim found nothing)
    if runtime.run_log.postgres:
        in_claim = [statement for number, statement in seen if number == min(claim)]
        assert len(in_claim) == 2, in_claim  # the claim, then the start with its event
        assert "INSERT INTO run_events" in in_claim[1] and "UPDATE runs SET status" in in_claim[1]
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
    assert run is not None and run.status == "completed" and run.started_at is not None


async def test_a_streamed_runs_model_is_asked_for_an_instant_answer_once(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim asks for an instant answer and learns the answer must be
    streamed (cued to take time): the execution streams it without asking
    again (the offline model parsed the prompt's cues and counted its tokens
    twice). A run answered at once is asked once as well."""
    asked: list[str] = []
    answer_at_once = runtime.llm.answer_at_once

    async def counting(request: llm.ChatRequest) -> list[llm.Event] | None:
        asked.append(request.messages[-1]["content"])
        return await answer_at_once(request)

    monkeypatch.setattr(runtime.llm, "answer_at_once", counting)
    streamed, instant = await _make_runs(runtime, 1, text="[[delay 1]] hello"), await _make_runs(runtime, 1)
    await Worker(runtime, concurrency=2).run_until_idle()
    assert await _statuses(runtime, streamed + instant) == dict.fromkeys(streamed + instant, "completed")
    assert sorted(asked) == ["[[delay 1]] hello", "hi"]


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_carried_move_that_misses_fails_its_transaction(runtime: Runtime) -> None:
    """PostgreSQL: a move carried by the events' insert (the claim's
    transaction) that finds the run no longer as held raises, so nothing
    of its statement (rows, events) can be committed."""
    (run_id,) = await _make_runs(runtime, 1)
    with pytest.raises(run_state.TransitionConflict):
        async with runtime.transaction() as session:
            run = await session.get(orm.Run, run_id)
            assert run is not None
            name, held = run_state.hold(run, "in_progress")  # the database still has it queued, no lease
            _name, statement = run_state.carried_move(run, "completed", held=held, lease_owner="someone")
            await run_events.insert_carrying(session, run_id, [Event(name, {"id": run_id})], statement)
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
        logged = (await session.scalars(select(orm.RunEvent.event).where(orm.RunEvent.run_id == run_id))).all()
    assert run is not None and run.status == "queued"
    assert "thread.run.in_progress" not in logged


async def test_the_first_prompt_is_read_by_the_claim(runtime: Runtime) -> None:
    """A queued run's earlier messages come back with its claim (issue 17:
    no read of its own), oldest first, a message of another run of the
    thread included; the prompt is the one a read would have built."""
    (run_id,) = await _make_runs(runtime, 1, text="first")
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
        assert run is not None
        thread_id, earlier_run = run.thread_id, ids.new_id(ids.RUN, ids.next_seq())
        texts = [("assistant", "second", earlier_run), ("user", "third", None)]
        for role, text, by_run in texts:
            seq = ids.next_seq()  # after the first message, before the run (moved below)
            session.add(
                orm.Message(
                    id=ids.new_id(ids.MESSAGE, seq), seq=seq, created_at=ids.seconds(seq), thread_id=thread_id,
                    role=role, run_id=by_run, status="completed", metadata_={},
                    content=[{"type": "text", "text": {"value": text, "annotations": []}}],
                )
            )  # fmt: skip
        run.seq = ids.next_seq()  # the run comes after them
    with statements_by_transaction(runtime) as seen:
        await Worker(runtime, concurrency=1).run_until_idle()
    assert not [statement for _n, statement in seen if statement.startswith("SELECT messages.role")], seen
    async with runtime.transaction() as session:
        (logged,) = await model_requests.list_for_run(session, run_id)
    chat = [(message["role"], message["content"]) for message in logged["request"]["messages"]]
    assert chat[-3:] == [("user", "first"), ("assistant", "second"), ("user", "third")]


async def _add_earlier_messages(runtime: Runtime, run_id: str, contents: list[list[dict[str, Any]]]) -> None:
    """Messages of the run's thread from before the run, oldest first."""
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
        assert run is not None
        for content in contents:
            session.add(user_message(run.thread_id, content))
        run.seq = ids.next_seq()  # the run comes after them


def _text(value: str) -> list[dict[str, Any]]:
    return [{"type": "text", "text": {"value": value, "annotations": []}}]


async def test_a_long_threads_prompt_has_every_earlier_message(runtime: Runtime) -> None:
    """The claim brings a queued run's earlier messages only for a short
    thread; a longer one's prompt reads them all, as before."""
    (run_id,) = await _make_runs(runtime, 1, text="m-first")
    count = run_execution.PREFETCH_MOST_MESSAGES + 3
    await _add_earlier_messages(runtime, run_id, [_text(f"m{n}") for n in range(count)])
    seen: list[llm.ChatRequest] = []

    async def observe(exchange: llm.Exchange) -> None:
        seen.append(exchange.request)

    runtime.llm.observer = observe
    await Worker(runtime, concurrency=1).run_until_idle()
    users = [str(message["content"]) for message in seen[0].messages if message["role"] == "user"]
    assert len(users) == count + 1, users
    assert users == ["m-first", *(f"m{n}" for n in range(count))]


@pytest.mark.parametrize(
    ("earlier", "read_by_the_prompt"),
    [(run_execution.PREFETCH_MOST_MESSAGES, False), (run_execution.PREFETCH_MOST_MESSAGES + 1, True)],
    ids=["prefetched", "one-more"],
)
async def test_the_prompt_has_every_earlier_message_at_the_prefetch_boundary(
    runtime: Runtime, earlier: int, read_by_the_prompt: bool
) -> None:
    """At exactly PREFETCH_MOST_MESSAGES earlier messages the claim brings
    them all; at one more the prompt reads them: either way the model gets
    every message, in order."""
    (run_id,) = await _make_runs(runtime, 1, text="m0")
    await _add_earlier_messages(runtime, run_id, [_text(f"m{n}") for n in range(1, earlier)])
    seen: list[llm.ChatRequest] = []

    async def observe(exchange: llm.Exchange) -> None:
        seen.append(exchange.request)

    runtime.llm.observer = observe
    # (The raw claim's prompt reads on the read engine: Runtime.claiming.)
    with (
        statements_by_transaction(runtime) as statements,
        statements_by_transaction(runtime, runtime.read_engine) as reads,
    ):
        await Worker(runtime, concurrency=1).run_until_idle()
    read = [statement for _n, statement in statements + reads if statement.startswith("SELECT messages.role")]
    assert bool(read) is read_by_the_prompt, read
    users = [str(message["content"]) for message in seen[0].messages if message["role"] == "user"]
    assert users == [f"m{n}" for n in range(earlier)]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_message_sqlites_json_refuses_stops_no_claim(runtime: Runtime) -> None:
    """A stored content SQLite's json() refuses (the stdlib's JSON, which
    wrote the column before orjson, wrote NaN; orjson writes null, so the
    text is stored here as the stdlib wrote it): the claim returns earlier
    messages as their stored text, decoded in Python; through json() the
    claim itself failed, and no run moved."""
    run_ids = await _make_runs(runtime, 2)
    content = [{"type": "text", "text": {"value": "odd", "annotations": [{"score": math.nan}]}}]
    await _add_earlier_messages(runtime, run_ids[0], [content])
    async with runtime.transaction() as session:
        await session.execute(
            text("UPDATE messages SET content = :content WHERE content LIKE '%odd%'"), {"content": json.dumps(content)}
        )
        assert (await session.execute(text("SELECT count(*) FROM messages WHERE content LIKE '%NaN%'"))).scalar() == 1
    async with asyncio.timeout(30):
        await Worker(runtime, concurrency=2).run_until_idle()
    assert await _statuses(runtime, run_ids) == {run_id: "completed" for run_id in run_ids}
