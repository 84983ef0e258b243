"""GET /threads/{thread_id}/runs/{run_id}/events: a run's event log as SSE.

An extension (OpenAI has no such endpoint; README, "Streaming from any
replica"): the run's events from the start, or after the sequence number a
client last saw (``Last-Event-ID`` header, what browsers' EventSource sends
on reconnect, or ``?after=N``), then live until the run stops for the stream
(requires_action or a final state) and ``done``. Frames are the ones a
streamed create or submit_tool_outputs sends, each with ``id: <seq>``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response

from app import errors
from app.api import sse
from app.api.deps import ProjectDep, RuntimeDep
from app.run_follow import Follower
from app.services import run_events, run_state, runs

router = APIRouter(tags=["runs"])

MAX_SEQUENCE = 2**31 - 1

DESCRIPTION = (
    "Extension (not part of OpenAI's API). Streams the run's events as server-sent events, the frames a "
    "streamed create or submit_tool_outputs sends, each with `id: <sequence number>`: from the start, or after "
    "the sequence number in the `Last-Event-ID` header or `after` query parameter, then live until the run "
    "stops for the stream (requires_action or a final status), ending with `event: done`. Any replica serves "
    "any run, whichever process executes it."
)


@router.get(
    "/threads/{thread_id}/runs/{run_id}/events",
    summary="Stream a run's events from its event log (extension)",
    description=DESCRIPTION,
    response_class=Response,
    responses={200: {"content": {"text/event-stream": {}}, "description": "The run's events as SSE."}},
)
async def stream_run_events(
    thread_id: str,
    run_id: str,
    runtime: RuntimeDep,
    project: ProjectDep,
    after: str | None = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> Response:
    start = _sequence("after", after) if after is not None else _sequence("Last-Event-ID", last_event_id)
    # Reads of one statement each (issue 17: on PostgreSQL no BEGIN or COMMIT,
    # on SQLite a WAL reader beside the writers).
    follower = Follower(runtime.bus, runtime.reading_statement, run_id, start, announced=runtime.log_news_announced)
    try:
        async with runtime.reading_statement() as session:
            run = await runs.get(session, project, thread_id, run_id)
            await follower.open()  # before reading the log: nothing falls between
            ended = run.status in run_state.TERMINAL
            if ended and not await run_events.read(session, run_id, start, limit=1):
                # Nothing more will be logged (the log may also have been pruned).
                await follower.close()
                return sse.nothing_more()
    except BaseException:
        await follower.close()
        raise
    return sse.RunStream(follower, keepalive=runtime.settings.stream_keepalive_seconds)


def _sequence(param: str, value: str | None) -> int:
    if value is None or value == "":
        return 0
    # isascii: str.isdigit() also accepts digits int() refuses ("²"); the
    # bound is the log's 32-bit seq column (a larger number would fail in SQL).
    if not (value.isascii() and value.isdigit()) or int(value) > MAX_SEQUENCE:
        raise errors.invalid(
            f"Invalid '{param}': '{value}'. Expected the sequence number of a run event (a non-negative integer).",
            param=param,
        )
    return int(value)
