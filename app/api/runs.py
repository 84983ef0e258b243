"""/threads/{thread_id}/runs, /threads/runs and run steps."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from app.api.deps import PageDep, RuntimeDep, respond
from app.services import run_steps, runs
from app.wire.common import ListPage
from app.wire.runs import Run, RunCreate, RunStep, RunUpdate, SubmitToolOutputs, ThreadAndRunCreate

router = APIRouter(tags=["runs"])

IncludeDep = Annotated[list[str], Query(alias="include[]")]


def _polled(model: Run, poll_after_ms: int) -> Response:
    response = respond(model)
    response.headers["openai-poll-after-ms"] = str(poll_after_ms)
    return response


@router.post("/threads/{thread_id}/runs", response_model=Run)
async def create_run(thread_id: str, body: RunCreate, runtime: RuntimeDep, include: IncludeDep = []) -> Response:  # noqa: B006
    run_steps.check_include(include)
    async with runtime.transaction() as session:
        run, events = await runs.create(session, thread_id, body, expires_in=runtime.settings.run_expires_seconds)
    runtime.announce(run.id, events)
    return respond(runs.to_wire(run))


@router.post("/threads/runs", response_model=Run)
async def create_thread_and_run(body: ThreadAndRunCreate, runtime: RuntimeDep) -> Response:
    async with runtime.transaction() as session:
        _thread, run, events = await runs.create_thread_and_run(
            session, body, expires_in=runtime.settings.run_expires_seconds
        )
    runtime.announce(run.id, events)
    return respond(runs.to_wire(run))


@router.get("/threads/{thread_id}/runs", response_model=ListPage[Run])
async def list_runs(thread_id: str, runtime: RuntimeDep, page: PageDep) -> Response:
    async with runtime.transaction() as session:
        return respond(await runs.list_(session, thread_id, page))


@router.get("/threads/{thread_id}/runs/{run_id}", response_model=Run)
async def retrieve_run(thread_id: str, run_id: str, runtime: RuntimeDep) -> Response:
    async with runtime.transaction() as session:
        run = await runs.get(session, thread_id, run_id)
    return _polled(runs.to_wire(run), runtime.settings.poll_after_ms)


@router.post("/threads/{thread_id}/runs/{run_id}", response_model=Run)
async def update_run(thread_id: str, run_id: str, body: RunUpdate, runtime: RuntimeDep) -> Response:
    async with runtime.transaction() as session:
        return respond(runs.to_wire(await runs.update(session, thread_id, run_id, body)))


@router.post("/threads/{thread_id}/runs/{run_id}/cancel", response_model=Run)
async def cancel_run(thread_id: str, run_id: str, runtime: RuntimeDep) -> Response:
    async with runtime.transaction() as session:
        answer, events = await runs.cancel(session, thread_id, run_id)
    runtime.announce(run_id, events)
    return respond(answer)


@router.post("/threads/{thread_id}/runs/{run_id}/submit_tool_outputs", response_model=Run)
async def submit_tool_outputs(thread_id: str, run_id: str, body: SubmitToolOutputs, runtime: RuntimeDep) -> Response:
    async with runtime.transaction() as session:
        run, events = await runs.submit_tool_outputs(session, thread_id, run_id, body)
    runtime.announce(run.id, events)
    return respond(runs.to_wire(run))


@router.get("/threads/{thread_id}/runs/{run_id}/steps", response_model=ListPage[RunStep])
async def list_run_steps(
    thread_id: str, run_id: str, runtime: RuntimeDep, page: PageDep, include: IncludeDep = []  # noqa: B006
) -> Response:
    run_steps.check_include(include)
    async with runtime.transaction() as session:
        run = await runs.get(session, thread_id, run_id)
        return respond(await run_steps.list_(session, run, page, include))


@router.get("/threads/{thread_id}/runs/{run_id}/steps/{step_id}", response_model=RunStep)
async def retrieve_run_step(
    thread_id: str, run_id: str, step_id: str, runtime: RuntimeDep, include: IncludeDep = []  # noqa: B006
) -> Response:
    run_steps.check_include(include)
    async with runtime.transaction() as session:
        run = await runs.get(session, thread_id, run_id)
        return respond(await run_steps.get(session, run, step_id, include))
