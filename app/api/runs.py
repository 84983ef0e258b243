"""/threads/{thread_id}/runs, /threads/runs and run steps.

Create run, create thread-and-run and submit_tool_outputs answer the run as
JSON, or with ``"stream": true`` in the body its events as SSE (api/sse.py),
on any replica, with or without a worker in its process.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app import errors, orm
from app.api import poll_hold, sse
from app.api.deps import PageDep, ProjectDep, RuntimeDep, respond
from app.run_follow import Follower
from app.runtime import Runtime
from app.services import new_rows, run_defaults, run_execution, run_state, run_steps, runs
from app.services.projects import Project
from app.wire.common import ListPage
from app.wire.events import Event
from app.wire.runs import Run, RunCreate, RunStep, RunUpdate, SubmitToolOutputs, ThreadAndRunCreate

router = APIRouter(tags=["runs"])

IncludeDep = Annotated[list[str], Query(alias="include[]")]


def _json_text(text: str) -> Response:
    """A wire object's JSON text as a run event carries it (wire/events.py):
    the same JSON value respond() writes for the object, not always the same
    bytes (wire/jsontext.py: U+2028, U+2029 and U+0085 escaped as in SSE
    frames, and non-ASCII escaped too where the stdlib encoder stands in
    for orjson, as for integers beyond 64 bits)."""
    return Response(text, media_type="application/json")


def _polled(answer: Run | str, poll_after_ms: int) -> Response:
    """A poll's answer: the run, or its JSON text as a held poll got it."""
    response = respond(answer) if isinstance(answer, Run) else _json_text(answer)
    response.headers["openai-poll-after-ms"] = str(poll_after_ms)
    return response


# A change that leaves a run queued, with the events that announce it. It
# may leave new rows unwritten, in what it is given: they are inserted with
# the events (PostgreSQL: by the same statement, under their condition, for
# a few rows; more go first, table by table).
QueueRun = Callable[[AsyncSession, new_rows.Unwritten], Awaitable[tuple[orm.Run, list[Event]]]]


async def _queue_run(
    runtime: Runtime, stream: bool | None, change: QueueRun, creator: Project | None = None
) -> Response:
    """Commit ``change`` with its events logged and wake the workers; answer
    the run, or stream it.

    A stream follows the run's log (whichever process executes it) from the
    events this transaction logged, subscribed before the commit makes the
    run visible to a worker, so it reads the log only when another process
    writes (wire notes 3.4). Errors raised by ``change`` are ordinary JSON errors.

    On PostgreSQL a ``change`` that sends no statement of its own (a new
    thread and run from remembered defaults, left to the append) makes the
    append the whole transaction: one statement in autocommit, no BEGIN or
    COMMIT (Runtime.unit_of_work; issue 17).

    A run made (or queued again: submit_tool_outputs) for ``creator``'s
    request and answered as JSON is noted for the SDK's poll that follows
    (poll_hold.note_created). Answered as JSON,
    a change whose last event queues the run (a create, submit_tool_outputs)
    answers that event's JSON text, as committed.
    """
    follower: Follower | None = None
    handing: asyncio.Future[None] | None = None
    answered: Event | None = None
    # An API replica's create wakes the workers with its own commit (issue
    # 17: not a transaction of its own after it); a worker here is woken in-process.
    notify = runtime.wakes_by_notify()
    try:
        async with runtime.unit_of_work() as session:
            unwritten = new_rows.Unwritten()
            run, events = await change(session, unwritten)
            if creator is not None and not stream:
                # Before the commit, so that no worker can claim the run and
                # publish its stopping event (which forgets the note) before
                # the note exists, as one here could while the commit's
                # answer is on its way. A commit that fails leaves a note of
                # an id nobody sees, forgotten once its reservation lapses.
                poll_hold.note_created(runtime, creator, run.id, run.thread_id, run.lease_owner, run.lease_expires_at)
            if stream:
                # Subscribed before the append, which may be the commit
                # itself; it reads from the opening events' end (set below).
                follower = Follower(
                    runtime.bus,
                    runtime.reading_statement,
                    run.id,
                    0,
                    read_first=False,
                    announced=runtime.log_news_announced,
                )
                await follower.open()
            # The run's hand-off, if it is handed, is built while the
            # statement below (SQLite: the commit's hop) is out, and sent once
            # it has committed (Worker.prepare; issue 17: on SQLite only a
            # provider run's, folded into this create).
            handing = None if notify or runtime.worker is None else runtime.worker.prepare(run)
            # The run as the create answers it (the JSON answer, a stream's
            # head): the event that queued it, though a provider run reserved
            # for this process's worker is inserted started (Worker.prepare,
            # run_state.start_in_create), its start logged by the same
            # statement, after it.
            answered = events[-1] if events else None
            if handing is not None and run.status == "in_progress":
                # Folded: only a run this transaction inserts can be started
                # so; on PostgreSQL the append below inserts it (its row
                # written in_progress: one ``change`` had already inserted
                # would stay queued, leased to nobody's task); on SQLite
                # ``change`` held its INSERT back (as queued), and an UPDATE
                # held back behind it writes the start in the same hop.
                if not any(row is run for row in unwritten.rows):
                    assert not runtime.run_log.postgres, "a folded run is inserted by its create"
                    await run_state.write_started_in_create(session, run)
                assert answered is not None and answered.name == "thread.run.queued", "a create queues its run"
                events = [*events, runs.started_in_create_event(answered, run)]
            # ``change`` inserted the run (or left it to this insert) or moved
            # it with a compare-and-set UPDATE: this transaction holds its row
            # lock (PostgreSQL), or no other sees the run yet.
            opening = await runtime.run_log.append(
                session,
                run.id,
                events,
                run_locked=True,
                inserting=unwritten.rows,
                inserting_only_if=unwritten.only_if,
                wake_workers=notify,
                last_statement=True,
            )
    except BaseException as error:
        if handing is not None and runtime.worker is not None:
            # SQLite's create is one hop seen through a cancellation
            # (sqlite_groups.commit_collected): only a cancelled one may have
            # committed (if its hop was under way, it has); PostgreSQL's
            # statement may have committed with any failure (a connection
            # lost after it went). A SQLite create cancelled before its
            # COMMIT was sent was in fact rolled back, yet is noted all the
            # same: each tick then sends a release that finds nothing, until
            # the noted lease lapses (rare; PostgreSQL's unknown outcomes do
            # the same).
            unknown = runtime.run_log.postgres or isinstance(error, asyncio.CancelledError)
            runtime.worker.dropped(run, handing, outcome_unknown=unknown)
        if follower is not None:
            await follower.close()
        raise
    worker = runtime.worker
    if not notify and (worker is None or not worker.hand(run)):
        runtime.wake(files=False)
    elif (
        handing is not None
        and worker is not None
        and (after := worker.answer_after(run, streamed=follower is not None)) is not None
    ):
        # A hand-off begun before the create goes on first (issue 17): a
        # folded run's first model call goes out, the provider answering
        # meanwhile; streamed, until the hand-off's statement is out (or the
        # run's task first waits), the stream's head written meanwhile.
        # Shielded: this request's cancellation leaves the hand-off's
        # future alone.
        await asyncio.shield(after)
    if follower is None:
        if answered is not None and answered.name == "thread.run.queued":
            # The run as committed, as the event that queued it carries it,
            # already encoded for the log: not validated and dumped again.
            return _json_text(answered.json)
        return respond(runs.to_wire(run))
    # As committed: on SQLite the run log numbers an append ahead of writing
    # it, and corrects ``opening`` if another process had written meanwhile.
    follower.last = opening[-1].seq
    return sse.RunStream(follower, opening, keepalive=runtime.settings.stream_keepalive_seconds)


@router.post("/threads/{thread_id}/runs", response_model=Run)
async def create_run(
    thread_id: str,
    body: RunCreate,
    runtime: RuntimeDep,
    project: ProjectDep,
    include: IncludeDep = [],  # noqa: B006
) -> Response:
    run_steps.check_include(include)
    expires_in = runtime.settings.run_expires_seconds
    reservation = runtime.run_reservation()

    def change(remembered: bool) -> QueueRun:
        return lambda session, unwritten: runs.create(
            session,
            project,
            thread_id,
            body,
            expires_in=expires_in,
            reservation=reservation,
            remembered=remembered,
            unwritten=unwritten,
        )

    with _released_if_refused(runtime, reservation):
        return await _queue_remembering(runtime, project, body.stream, body.assistant_id, change)


@router.post("/threads/runs", response_model=Run)
async def create_thread_and_run(body: ThreadAndRunCreate, runtime: RuntimeDep, project: ProjectDep) -> Response:
    reservation = runtime.run_reservation()

    def change(remembered: bool) -> QueueRun:
        async def create(session: AsyncSession, unwritten: new_rows.Unwritten) -> tuple[orm.Run, list[Event]]:
            _thread, run, events = await runs.create_thread_and_run(
                session,
                project,
                body,
                expires_in=runtime.settings.run_expires_seconds,
                reservation=reservation,
                remembered=remembered,
                unwritten=unwritten,
            )
            return run, events

        return create

    with _released_if_refused(runtime, reservation):
        return await _queue_remembering(runtime, project, body.stream, body.assistant_id, change)


@contextmanager
def _released_if_refused(runtime: Runtime, reservation: run_execution.Reservation | None) -> Iterator[None]:
    """A run's create (or its tool outputs' submission) refused with an API
    error (its thread busy, its assistant missing, a bad value), which
    leaves nothing written (raised before any write, or after a statement
    that added no row, its transaction rolled back: PostgreSQL's live-run
    insert): the reservation taken for its run is given back
    (Worker.release). Any other failure may have written the run (an
    outcome unknown), reserved: the worker's next claim counts it."""
    try:
        yield
    except errors.APIError:
        runtime.release_reservation(reservation)
        raise


async def _queue_remembering(
    runtime: Runtime, project: Project, stream: bool | None, assistant_id: str, change: Callable[[bool], QueueRun]
) -> Response:
    """_queue_run() of a new run made from its assistant's remembered
    defaults (``change(True)``; services/run_defaults.py), or, if the
    assistant changed since, of one made from a fresh read: the first
    attempt wrote nothing."""
    try:
        return await _queue_run(runtime, stream, change(True), project)
    except (IntegrityError, run_defaults.StaleDefaults) as error:
        if not run_defaults.is_stale(error):
            raise
    run_defaults.forget(assistant_id)
    return await _queue_run(runtime, stream, change(False), project)


@router.get("/threads/{thread_id}/runs", response_model=ListPage[Run])
async def list_runs(thread_id: str, runtime: RuntimeDep, project: ProjectDep, page: PageDep) -> Response:
    async with runtime.transaction() as session:
        return respond(await runs.list_(session, project, thread_id, page))


@router.get("/threads/{thread_id}/runs/{run_id}", response_model=Run)
async def retrieve_run(
    thread_id: str,
    run_id: str,
    runtime: RuntimeDep,
    project: ProjectDep,
    poll_helper: Annotated[str | None, Header(alias="x-stainless-poll-helper", include_in_schema=False)] = None,
) -> Response:
    if poll_helper == "true" and runtime.settings.poll_hold_ms > 0:
        answer: Run | str = await poll_hold.retrieve_when_stopped(runtime, project, thread_id, run_id)
    else:
        async with runtime.poll_read() as connection:
            answer = runs.to_wire(await runs.get_row(connection, project, thread_id, run_id))
    return _polled(answer, runtime.settings.poll_after_ms)


@router.post("/threads/{thread_id}/runs/{run_id}", response_model=Run)
async def update_run(
    thread_id: str, run_id: str, body: RunUpdate, runtime: RuntimeDep, project: ProjectDep
) -> Response:
    async with runtime.transaction() as session:
        return respond(runs.to_wire(await runs.update(session, project, thread_id, run_id, body)))


@router.post("/threads/{thread_id}/runs/{run_id}/cancel", response_model=Run)
async def cancel_run(thread_id: str, run_id: str, runtime: RuntimeDep, project: ProjectDep) -> Response:
    async with runtime.transaction() as session:
        answer, events = await runs.cancel(session, project, thread_id, run_id)
        # runs.cancel moved the run (an UPDATE), which holds its row lock.
        await runtime.run_log.append(session, run_id, events, run_locked=True)
    runtime.wake(files=False)
    return respond(answer)


@router.post("/threads/{thread_id}/runs/{run_id}/submit_tool_outputs", response_model=Run)
async def submit_tool_outputs(
    thread_id: str, run_id: str, body: SubmitToolOutputs, runtime: RuntimeDep, project: ProjectDep
) -> Response:
    reservation = runtime.run_reservation()
    with _released_if_refused(runtime, reservation):
        return await _queue_run(
            runtime,
            body.stream,
            lambda session, _unwritten: runs.submit_tool_outputs(
                session, project, thread_id, run_id, body, reservation
            ),
            project,
        )


@router.get("/threads/{thread_id}/runs/{run_id}/steps", response_model=ListPage[RunStep])
async def list_run_steps(
    thread_id: str,
    run_id: str,
    runtime: RuntimeDep,
    project: ProjectDep,
    page: PageDep,
    include: IncludeDep = [],  # noqa: B006
) -> Response:
    run_steps.check_include(include)
    async with runtime.transaction() as session:
        run = await runs.get(session, project, thread_id, run_id)
        return respond(await run_steps.list_(session, run, page, include))


@router.get("/threads/{thread_id}/runs/{run_id}/steps/{step_id}", response_model=RunStep)
async def retrieve_run_step(
    thread_id: str,
    run_id: str,
    step_id: str,
    runtime: RuntimeDep,
    project: ProjectDep,
    include: IncludeDep = [],  # noqa: B006
) -> Response:
    run_steps.check_include(include)
    async with runtime.transaction() as session:
        run = await runs.get(session, project, thread_id, run_id)
        return respond(await run_steps.get(session, run, step_id, include))
