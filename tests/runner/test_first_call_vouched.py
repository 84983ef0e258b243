"""PostgreSQL: a folded run's first model call is sent while its create's
statement is out only if the assistant's defaults it was made from are
vouched for (run_defaults.vouch): read while this process heard the
assistants' changes (an update or delete NOTIFYs the assistant's id at its
COMMIT, run_defaults.announce_change; the run-events listener hears it), and
no change heard since. A change heard makes the next create read the
assistant again; with nobody listening, the call waits for the commit, so a
create refused for stale defaults has sent no prompt."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import text

from app import llm, orm
from app.runtime import Runtime
from app.services import admin, assistants, run_defaults
from app.services.projects import Project
from app.settings import Settings
from app.wire.assistants import AssistantUpdate
from tests.runner.helpers import until
from tests.runner.test_first_call_out import _held_until_the_call_is_out
from tests.runner.test_hand_off import _assistant, _never_at_once
from tests.runner.test_hand_off_early import _worker, handing_runtime
from tests.runner.test_start_folded import _executed, _noting, _queue

pytestmark = [pytest.mark.timeout(30), pytest.mark.parametrize("database_url", ["postgres"], indirect=True)]


@pytest.fixture
async def runtime(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Runtime]:
    """As test_first_call_out's (the offline model taken for a provider's),
    once its listener hears the assistants' changes."""
    async with handing_runtime(settings) as rt:
        monkeypatch.setattr(rt.llm, "streams", lambda _model: True)
        monkeypatch.setattr(rt.llm, "answer_at_once", _never_at_once)
        await until(lambda: rt.run_log.listening, "the runtime's listener to listen")
        yield rt


def _instructions_sent(runtime: Runtime, monkeypatch: pytest.MonkeyPatch, order: list[str]) -> list[str]:
    """Each model call's system text, in the order sent; "call sent" noted
    in ``order`` too."""
    sent: list[str] = []
    real_stream = runtime.llm.stream

    async def stream(request: llm.ChatRequest) -> AsyncIterator[llm.Event]:
        order.append("call sent")
        sent.append(next((m["content"] for m in request.messages if m["role"] == "system"), ""))
        async for event in real_stream(request):
            yield event

    monkeypatch.setattr(runtime.llm, "stream", stream)
    return sent


async def _set_instructions(runtime: Runtime, assistant_id: str, instructions: str) -> None:
    """The assistant changed as another process's update changes it: its
    NOTIFY in the same transaction (run_defaults.announce_change)."""
    async with runtime.engine.begin() as connection:
        await connection.execute(
            text("UPDATE assistants SET instructions = :text WHERE id = :id"),
            {"text": instructions, "id": assistant_id},
        )
        await connection.execute(
            text("SELECT pg_notify(:channel, :id)"), {"channel": run_defaults.CHANGES_CHANNEL, "id": assistant_id}
        )


async def _changed_and_heard(runtime: Runtime, assistant_id: str, instructions: str) -> None:
    """_set_instructions(), once this process has heard it (a change heard
    late would otherwise land in a later read, which it would leave unvouched)."""
    changes = run_defaults._HEARING.changes
    await _set_instructions(runtime, assistant_id, instructions)
    await until(lambda: run_defaults._HEARING.changes > changes, "the change to be heard", 10)


async def test_postgres_a_change_heard_from_another_process_sends_only_the_new_prompt(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    assistant_id = await _assistant(runtime)
    await _changed_and_heard(runtime, assistant_id, "OLD instructions")
    await _queue(runtime, assistant_id)  # reads and remembers the defaults
    await _executed(runtime)
    await _changed_and_heard(runtime, assistant_id, "NEW instructions")
    order: list[str] = []
    sent = _instructions_sent(runtime, monkeypatch, order)
    _noting(runtime, monkeypatch, then=_held_until_the_call_is_out(order))
    await _queue(runtime, assistant_id, remembering=True)
    await _executed(runtime)
    # Read again (the change heard), vouched for: sent ahead of the commit.
    assert sent == ["NEW instructions"] and order.index("call sent") < order.index("created"), (sent, order)


async def test_postgres_unheard_stale_defaults_send_no_prompt_before_the_create_has_committed(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener down: nothing vouched for. A create from remembered
    defaults another process changed meanwhile is refused by its check and
    made again from a read; the provider sees the new prompt alone."""
    assistant_id = await _assistant(runtime)
    await _changed_and_heard(runtime, assistant_id, "OLD instructions")
    await _queue(runtime, assistant_id)
    await _executed(runtime)
    listener = runtime._listener
    assert listener is not None
    listener.cancel()
    await asyncio.gather(listener, return_exceptions=True)
    assert not runtime.run_log.listening and run_defaults.vouch(assistant_id) is None
    await _set_instructions(runtime, assistant_id, "NEW instructions")  # heard by nobody
    order: list[str] = []
    sent = _instructions_sent(runtime, monkeypatch, order)
    noted = _noting(runtime, monkeypatch)
    await _queue(runtime, assistant_id, remembering=True)
    await _worker(runtime).run_until_idle()  # (the run made again is claimed)
    await _executed(runtime)
    assert sent == ["NEW instructions"], sent
    assert noted.count("create sent") == 2, noted  # refused, then made again from a read


@pytest.mark.parametrize("change", ["update", "delete", "reset"])
async def test_postgres_an_assistants_update_or_delete_announces_it_at_its_commit(
    runtime: Runtime, database_url: str, change: str
) -> None:
    """reset (the admin API's wipe): every assistant, and this process
    forgets every remembered default at once."""
    assistant_id = await _assistant(runtime)
    project = Project(id=orm.DEFAULT_PROJECT_ID, name="default")
    async with runtime.transaction() as session:
        await run_defaults.read(session, project, assistant_id)  # remembered
    heard: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await listener.add_listener(
            run_defaults.CHANGES_CHANNEL, lambda _c, _pid, _channel, payload: heard.put_nowait(payload)
        )
        async with runtime.transaction() as session:
            if change == "update":
                await assistants.update(session, project, assistant_id, AssistantUpdate(instructions="changed"))
            elif change == "delete":
                await assistants.delete(session, project, assistant_id)
            else:
                await admin.reset(session)
        expected = run_defaults.EVERY_ASSISTANT if change == "reset" else assistant_id
        assert await asyncio.wait_for(heard.get(), 10) == expected  # (named within the test's timeout)
        assert run_defaults.remembered(project, assistant_id) is None
    finally:
        await listener.close()


async def test_postgres_a_listener_opened_again_forgets_what_was_remembered(runtime: Runtime) -> None:
    """Its connection lost (here ended by PostgreSQL), the listener opens
    another: changes sent meanwhile were not heard, so every remembered
    default is forgotten, and read afresh by its next run, vouched for then
    (remembered unvouched, its runs' first calls would wait for their
    commits until the assistant changed again)."""
    assistant_id = await _assistant(runtime)
    project = Project(id=orm.DEFAULT_PROJECT_ID, name="default")
    async with runtime.transaction() as session:
        await run_defaults.read(session, project, assistant_id)
    assert run_defaults.vouch(assistant_id) is not None
    epoch = run_defaults._HEARING.epoch
    async with runtime.engine.connect() as connection:
        ended = await connection.scalar(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid() AND query ILIKE 'LISTEN%'"
            )
        )
    assert ended == 1, ended
    await until(
        lambda: run_defaults._HEARING.epoch > epoch and runtime.run_log.listening, "the listener to open again", 10
    )
    assert run_defaults.remembered(project, assistant_id) is None
    async with runtime.transaction() as session:
        await run_defaults.read(session, project, assistant_id)
    assert run_defaults.vouch(assistant_id) is not None
