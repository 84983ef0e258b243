"""/console pages: assistants, threads and their messages, a run's timeline
(steps, tool calls, what the model was sent), vector stores with search,
files. Thin handlers: read through the services, render a template."""

from __future__ import annotations

import datetime
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from functools import cache
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Form, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from markupsafe import Markup

from app import errors
from app.console import auth
from app.run_follow import Follower
from app.runtime import Runtime
from app.services import (
    assistants,
    console,
    files,
    messages,
    model_requests,
    run_steps,
    runs,
    threads,
    vector_store_files,
    vector_store_search,
    vector_stores,
)
from app.services.pagination import PageParams
from app.wire.runs import FILE_SEARCH_CONTENT_INCLUDE
from app.wire.vector_stores import SearchRequest

if TYPE_CHECKING:
    from fastapi.templating import Jinja2Templates

HERE = Path(__file__).parent
PAGE_SIZE = 50
TERMINAL = frozenset({"completed", "failed", "cancelled", "expired", "incomplete"})


class ConsoleRoute(APIRoute):
    """Console routes answer in HTML: a sign-in redirect, or an error page
    where the API would answer with its JSON error."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_in_html(request: Request) -> Response:
            try:
                return await handle(request)
            except auth.SignInRequired:
                return RedirectResponse(f"/console/login?next={request.url.path}", status_code=303)
            except errors.APIError as exc:
                return _render(request, "error.html", status_code=exc.status, message=exc.message)
            except RequestValidationError:
                return _render(request, "error.html", status_code=400, message="That page does not exist.")

        return handle_in_html


router = APIRouter(prefix="/console", include_in_schema=False, route_class=ConsoleRoute)


def _when(value: int | None) -> str:
    if not value:
        return ""
    return datetime.datetime.fromtimestamp(value, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _pretty(value: Any) -> str:
    """JSON (or text holding JSON) indented for reading; other text as it is."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return str(value)
    return json.dumps(value, indent=2, ensure_ascii=False)


def _annotated(text: dict[str, Any]) -> Markup:
    """A message's text with each annotation's marker turned into a link to its file."""
    value: str = text.get("value") or ""
    out: list[str] = []
    position = 0
    for note in sorted(text.get("annotations") or [], key=lambda note: note.get("start_index", 0)):
        start, end = note.get("start_index", 0), note.get("end_index", 0)
        if start < position or end > len(value):
            continue
        target = (note.get("file_citation") or note.get("file_path") or {}).get("file_id")
        out.append(escape(value[position:start]))
        label = escape(value[start:end])
        if target:
            kind = escape(note.get("type", ""))
            out.append(f'<a class="annotation {kind}" href="/console/files/{escape(target)}">{label}</a>')
        else:
            out.append(label)
        position = end
    out.append(escape(value[position:]))
    return Markup("".join(out))  # noqa: S704 (every piece above is escaped)


@cache
def _templates() -> Jinja2Templates:
    """The templates, made by the first page rendered: jinja2 is imported
    then, not at start-up (about 2 MiB of an idle server that may never
    serve the console; the first page takes the import's 30-60 ms, issue 17)."""
    from fastapi.templating import Jinja2Templates

    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["when"] = _when
    templates.env.filters["pretty"] = _pretty
    templates.env.filters["annotated"] = _annotated
    return templates


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def _render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    return _templates().TemplateResponse(request, name, {"page": name.removesuffix(".html"), **context}, status_code)


def _page(after: str | None, order: str = "desc") -> PageParams:
    return PageParams(limit=PAGE_SIZE, order=order, after=after, before=None)  # type: ignore[arg-type]


# ---------------------------------------------------------------- sign-in


@router.get("/login")
async def login_form(request: Request, next: str = "/console/assistants") -> HTMLResponse:
    return _render(request, "login.html", next=next, failed=False)


@router.post("/login")
async def login(request: Request, key: Annotated[str, Form()], next: Annotated[str, Form()] = "") -> Response:
    if await auth.project_of_key(request, key) is None:
        return _render(request, "login.html", status_code=401, next=next, failed=True)
    target = next if next.startswith("/console") else "/console/assistants"
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(auth.COOKIE, key, httponly=True, samesite="strict", path="/console")
    return response


@router.get("/logout")
async def logout() -> Response:
    response = RedirectResponse("/console/login", status_code=303)
    response.delete_cookie(auth.COOKIE, path="/console")
    return response


# ---------------------------------------------------------------- pages


@router.get("")
async def home(_: auth.SignedIn) -> Response:
    return RedirectResponse("/console/assistants", status_code=303)


@router.get("/assistants")
async def assistant_list(request: Request, project: auth.SignedIn, after: str | None = None) -> HTMLResponse:
    async with _runtime(request).transaction() as session:
        page = await assistants.list_(session, project, _page(after))
    return _render(request, "assistants.html", items=page.data, has_more=page.has_more, last_id=page.last_id)


@router.get("/assistants/{assistant_id}")
async def assistant_detail(request: Request, assistant_id: str, project: auth.SignedIn) -> HTMLResponse:
    async with _runtime(request).transaction() as session:
        assistant = assistants.to_wire(await assistants.get(session, project, assistant_id))
    return _render(request, "assistant.html", assistant=assistant)


@router.get("/threads")
async def thread_list(request: Request, project: auth.SignedIn, after: str | None = None) -> HTMLResponse:
    async with _runtime(request).transaction() as session:
        rows, has_more = await console.recent_threads(session, project, _page(after))
    items = [threads.to_wire(row) for row in rows]
    return _render(request, "threads.html", items=items, has_more=has_more, last_id=items[-1].id if items else None)


@router.get("/threads/{thread_id}")
async def thread_detail(
    request: Request, thread_id: str, project: auth.SignedIn, after: str | None = None
) -> HTMLResponse:
    async with _runtime(request).transaction() as session:
        row = await threads.get(session, project, thread_id)
        thread = threads.to_wire(row)
        page = await messages.list_(session, project, thread_id, _page(after, "asc"))
        run_rows, _more = await console.runs_of_thread(session, row, _page(None))
    return _render(
        request,
        "thread.html",
        thread=thread,
        items=page.data,
        has_more=page.has_more,
        last_id=page.last_id,
        runs=[runs.to_wire(row) for row in run_rows],
    )


@router.get("/threads/{thread_id}/runs/{run_id}")
async def run_detail(
    request: Request, thread_id: str, run_id: str, project: auth.SignedIn, fragment: bool = False
) -> HTMLResponse:
    async with _runtime(request).transaction() as session:
        run = await runs.get(session, project, thread_id, run_id)
        steps = [
            run_steps.to_wire(row, [FILE_SEARCH_CONTENT_INCLUDE]) for row in await run_steps.of_run(session, run.id)
        ]
        sent = await model_requests.list_for_run(session, run.id)
        wire = runs.to_wire(run)
    name = "run_timeline.html" if fragment else "run.html"
    return _render(request, name, run=wire, steps=steps, requests=sent, live=wire.status not in TERMINAL)


@router.get("/threads/{thread_id}/runs/{run_id}/live")
async def run_live(request: Request, thread_id: str, run_id: str, project: auth.SignedIn) -> StreamingResponse:
    """Server-sent "update" events while the run changes, then "end": the
    page re-renders its timeline on each (console.js). Read from the run's
    event log (issue 11), so it works whichever process executes the run."""
    runtime = _runtime(request)
    # Reads of one statement each, here and the follower's (issue 17: on
    # PostgreSQL no BEGIN or COMMIT, on SQLite a WAL reader beside the writers).
    async with runtime.reading_statement() as session:
        status = (await runs.get(session, project, thread_id, run_id)).status  # 404 for a run that is not there

    async def events() -> AsyncIterator[bytes]:
        if status in TERMINAL:  # it ended before the page asked
            yield b"event: end\ndata: done\n\n"
            return
        # From the log's start: whatever happened since the page was rendered shows.
        follower = Follower(runtime.bus, runtime.reading_statement, run_id, 0, announced=runtime.log_news_announced)
        await follower.open()
        try:
            while True:
                batch = await follower.next_batch(15)
                if not batch:
                    yield b": ping\n\n"
                names = [entry.event.name for entry in batch if not entry.event.name.endswith(".delta")]
                # The timeline changes at step and status events, not at deltas.
                if names:
                    yield f"event: update\ndata: {names[-1]}\n\n".encode()
                if any(name.startswith("thread.run.") and name.split(".")[-1] in TERMINAL for name in names):
                    break
            yield b"event: end\ndata: done\n\n"
        finally:
            await follower.close()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


@router.get("/vector_stores")
async def store_list(request: Request, project: auth.SignedIn, after: str | None = None) -> HTMLResponse:
    async with _runtime(request).transaction() as session:
        page = await vector_stores.list_(session, project, _page(after))
    return _render(request, "vector_stores.html", items=page.data, has_more=page.has_more, last_id=page.last_id)


@router.get("/vector_stores/{store_id}")
async def store_detail(
    request: Request,
    store_id: str,
    project: auth.SignedIn,
    q: Annotated[str, Query(max_length=4096)] = "",
    after: str | None = None,
) -> HTMLResponse:
    runtime = _runtime(request)
    async with runtime.transaction() as session:
        store_row = await vector_stores.get(session, project, store_id)
        store = await vector_stores.to_wire(session, store_row)
        page = await vector_store_files.list_(session, store_row, _page(after), None)
        counts = await console.chunk_counts(session, store_row, [item.id for item in page.data])
    results = None
    if q.strip():
        from app.retrieval import embed  # the embedder follows the routing file, as the search endpoint's does

        vectors = await embed.start_query_embedding(runtime.settings, [q])
        try:
            async with runtime.reading() as session:  # as the search endpoint: outside SQLite's write lock
                found = await vector_store_search.search(
                    session, project, store_id, SearchRequest(query=q, max_num_results=10), vectors
                )
        finally:
            vectors.cancel()
        results = found.page
        stale = [store_id] if vector_stores.stale_activity(found.store) else []
        await vector_stores.record_activity(runtime.transaction, stale)
    return _render(
        request,
        "vector_store.html",
        store=store,
        items=page.data,
        counts=counts,
        has_more=page.has_more,
        last_id=page.last_id,
        q=q,
        results=results.data if results else None,
    )


@router.get("/files")
async def file_list(request: Request, project: auth.SignedIn, after: str | None = None) -> HTMLResponse:
    runtime = _runtime(request)
    async with runtime.transaction() as session:
        page = await files.list_(session, runtime.storage, project, _page(after), None)
    return _render(request, "files.html", items=page.data, has_more=page.has_more, last_id=page.last_id)


@router.get("/files/{file_id}")
async def file_download(request: Request, file_id: str, project: auth.SignedIn) -> Response:
    runtime = _runtime(request)
    async with runtime.transaction() as session:
        row, path = await files.content_path(session, runtime.storage, project, file_id)
    inline = row.filename.lower().endswith((".png", ".jpg", ".jpeg", ".gif", ".webp", ".txt", ".md", ".csv"))
    return FileResponse(path, filename=row.filename, content_disposition_type="inline" if inline else "attachment")


def mount_static(app: Any) -> None:
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="console-static")
