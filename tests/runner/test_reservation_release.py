"""A run's create refused with an API error (its assistant or its thread
missing, tool outputs for no such run) gives back the reservation taken
for its run (Worker.release): the next run created is handed to the worker
as a lone run is, not left to a tick's claim as one created beside another
reserved run. A create made again from a fresh read (its remembered
defaults stale) takes one reservation, not two."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select, update

from app import errors, orm
from app.api import runs as api_runs
from app.runtime import Runtime
from app.services import run_defaults
from app.services.projects import Project
from app.settings import Settings
from app.wire.runs import RunCreate, SubmitToolOutputs, ThreadAndRunCreate
from tests.runner.test_hand_off import _assistant, _row
from tests.runner.test_hand_off_early import _worker, handing_runtime

pytestmark = pytest.mark.timeout(30)

_PROJECT = Project(id=orm.DEFAULT_PROJECT_ID, name="default")


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    async with handing_runtime(settings) as rt:
        yield rt


def _new_thread_and_run(assistant_id: str) -> ThreadAndRunCreate:
    return ThreadAndRunCreate.model_validate(
        {"assistant_id": assistant_id, "thread": {"messages": [{"role": "user", "content": "hi"}]}}
    )


async def _handed_and_ended(runtime: Runtime, assistant_id: str) -> None:
    """A new thread and run, through the API's own handler: handed to the
    worker (no tick's claim), and ended."""
    worker = _worker(runtime)
    claims = worker._claims
    await api_runs.create_thread_and_run(_new_thread_and_run(assistant_id), runtime, _PROJECT)
    assert worker._claims == claims, "the run was left to a tick's claim, not handed"
    await _settled(runtime)


async def _settled(runtime: Runtime) -> None:
    worker = _worker(runtime)
    await worker._handed()
    for task in list(worker._tasks.values()):
        await task
    assert worker._reserved == 0, worker._reserved


async def test_a_create_refused_for_a_missing_assistant_gives_its_reservation_back(runtime: Runtime) -> None:
    assistant = await _assistant(runtime)
    with pytest.raises(errors.APIError):
        await api_runs.create_thread_and_run(_new_thread_and_run("asst_missing"), runtime, _PROJECT)
    assert _worker(runtime)._reserved == 0
    await _handed_and_ended(runtime, assistant)


async def test_a_run_on_a_missing_thread_and_refused_tool_outputs_give_theirs_back(runtime: Runtime) -> None:
    assistant = await _assistant(runtime)
    thread_id = await _thread_of_a_run(runtime, assistant)
    with pytest.raises(errors.APIError):
        await api_runs.create_run(
            "thread_missing", RunCreate.model_validate({"assistant_id": assistant}), runtime, _PROJECT, include=[]
        )
    with pytest.raises(errors.APIError):
        await api_runs.submit_tool_outputs(
            thread_id, "run_missing", SubmitToolOutputs.model_validate({"tool_outputs": []}), runtime, _PROJECT
        )
    assert _worker(runtime)._reserved == 0
    await _handed_and_ended(runtime, assistant)


async def test_a_create_made_again_from_a_fresh_read_takes_one_reservation(runtime: Runtime) -> None:
    assistant = await _assistant(runtime)
    await _handed_and_ended(runtime, assistant)  # its defaults remembered
    async with runtime.transaction() as session:  # changed behind this process's back (nothing heard)
        await session.execute(update(orm.Assistant).where(orm.Assistant.id == assistant).values(instructions="changed"))
    assert run_defaults.remembered(_PROJECT, assistant) is not None
    await _handed_and_ended(runtime, assistant)  # refused, made again from a read, handed still
    row = await _latest_run(runtime)
    assert row.instructions == "changed"


async def _thread_of_a_run(runtime: Runtime, assistant_id: str) -> str:
    await _handed_and_ended(runtime, assistant_id)
    return (await _latest_run(runtime)).thread_id


async def _latest_run(runtime: Runtime) -> orm.Run:
    async with runtime.transaction() as session:
        run_id = (await session.scalars(select(orm.Run.id).order_by(orm.Run.seq.desc()).limit(1))).one()
    return await _row(runtime, run_id)
