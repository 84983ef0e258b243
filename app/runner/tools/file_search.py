"""The file_search built-in tool: searches the run's vector stores (the
assistant's, or the create-thread-and-run override, plus the thread's) and
cites what it found.

Each retrieved chunk is shown to the model behind a marker such as
``【3:0†report.pdf】`` (step 3 of the run, result 0). Markers the final
answer repeats become ``file_citation`` annotations pointing at the file.
The built-in offline model echoes the tool output, so citations work
offline too.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from app import llm, orm
from app.retrieval import embed
from app.retrieval import search as ranking
from app.runner.tools import PublishDelta, ToolResult
from app.services import v1_files, vector_store_search, vector_stores

if TYPE_CHECKING:
    from app.runtime import Runtime

DEFAULT_MAX_RESULTS = 20
# A run waits this long for the thread store's files still being ingested (DOC-FS).
THREAD_STORE_WAIT_SECONDS = 60.0  # also an assistant's v1 retrieval store
WAIT_POLL_SECONDS = 0.1
RANKER = "default_2024_08_21"
_MARKER = re.compile(r"【\d+:\d+†[^】]*】")


@dataclass
class FileSearchResult(ToolResult):
    citations: dict[str, str] = field(default_factory=dict)  # marker -> file id


class _Call:
    def first(self) -> dict[str, Any]:
        return {"type": "file_search", "file_search": {}}

    def feed(self, fragment: str) -> dict[str, Any] | None:
        return None  # OpenAI streams no argument deltas for file_search


@dataclass
class _Stores:
    searched: list[str]
    thread_store: str | None
    expired: list[str]
    stale: list[str]  # searched stores whose activity is older than a second (vector_stores.stale_activity)


class FileSearch:
    type = "file_search"

    def definition(self, run_tool: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": "file_search",
                "description": "Search the files uploaded for this conversation. Cite results with their "
                "【n:m†file】 markers exactly as given.",
                "parameters": {
                    "type": "object",
                    "properties": {"query": {"type": "string", "description": "What to look for."}},
                    "required": ["query"],
                },
            },
        }

    def start_call(self, call_id: str) -> _Call:
        return _Call()

    async def execute(
        self, runtime: Runtime, run: orm.Run, call_id: str, arguments: str, publish: PublishDelta
    ) -> ToolResult:
        options = _options(run)
        ranking_options = {"ranker": RANKER, "score_threshold": options["score_threshold"]}
        queries = _queries(arguments)
        if not queries:
            call = {
                "id": call_id,
                "type": "file_search",
                "file_search": {"ranking_options": ranking_options, "results": []},
            }
            return FileSearchResult(call=call, output='Error: file_search needs a "query" string.')
        stores = await _wait_for_thread_store(runtime, run)
        if stores.expired:
            raise llm.LLMError(
                "server_error", f"Vector store {stores.expired[0]} is expired. Create a new vector store and try again."
            )
        vectors = await embed.start_query_embedding(runtime.settings, queries)
        try:
            # Read-only: on SQLite outside the write lock (Runtime.reading).
            async with runtime.reading() as session:
                hits = await ranking.search(
                    session,
                    stores.searched,
                    queries,
                    options["max_num_results"],
                    score_threshold=options["score_threshold"],
                    query_vectors=vectors,
                )
                files = await vector_store_search.files_of_hits(session, hits)
                turn = await _turn(session, run)
        finally:
            vectors.cancel()
        await vector_stores.record_activity(runtime.transaction, stores.stale)
        return _result(
            call_id,
            ranking_options,
            turn,
            [(h, files[(h.vector_store_id, h.file_id)]) for h in hits if (h.vector_store_id, h.file_id) in files],
        )

    def decorate(
        self, runtime: Runtime, run: orm.Run, content: list[dict[str, Any]], results: list[ToolResult]
    ) -> list[dict[str, Any]]:
        citations: dict[str, str] = {}
        for result in results:
            if isinstance(result, FileSearchResult):
                citations.update(result.citations)
        if not citations:
            return content
        return [_annotate(part, citations) for part in content]


def _options(run: orm.Run) -> dict[str, Any]:
    for tool in run.tools or []:
        if tool.get("type") == "file_search":
            options = tool.get("file_search") or {}
            threshold = (options.get("ranking_options") or {}).get("score_threshold", 0.0)
            return {
                "max_num_results": options.get("max_num_results") or DEFAULT_MAX_RESULTS,
                "score_threshold": float(threshold),
            }
    return {"max_num_results": DEFAULT_MAX_RESULTS, "score_threshold": 0.0}


def _queries(arguments: str) -> list[str]:
    try:
        parsed = json.loads(arguments or "{}")
    except ValueError:
        return []
    if not isinstance(parsed, dict):
        return []
    query = parsed.get("query", parsed.get("queries"))
    if isinstance(query, str):
        return [query] if query.strip() else []
    if isinstance(query, list):
        return [item for item in query if isinstance(item, str) and item.strip()]
    return []


def _store_ids(resources: dict[str, Any] | None) -> list[str]:
    return list(((resources or {}).get("file_search") or {}).get("vector_store_ids") or [])


async def _stores(runtime: Runtime, run: orm.Run) -> tuple[_Stores, int]:
    """The run's stores and how many files of the thread's store are still in progress."""
    async with runtime.reading() as session:  # read-only: on SQLite outside the write lock
        assistant = await session.get(orm.Assistant, run.assistant_id)
        thread = await session.get(orm.Thread, run.thread_id)
        override = (
            _store_ids(run.tool_resources) if run.tool_resources and "file_search" in run.tool_resources else None
        )
        own = override if override is not None else _store_ids(assistant.tool_resources if assistant else None)
        thread_ids = _store_ids(thread.tool_resources if thread else None)
        ids = list(dict.fromkeys(own + thread_ids))
        # Only the stores of the run's project (its thread's), whatever ids the
        # resources name: attaching checks this too, this is the last word.
        project_id = thread.project_id if thread else None
        query = select(orm.VectorStore).where(orm.VectorStore.id.in_(ids), orm.VectorStore.project_id == project_id)
        rows = (await session.scalars(query)).all()
        expired = [row.id for row in rows if vector_stores.is_expired(row)]
        # Waited for: the thread's store, and an assistant's v1 retrieval store
        # (v1 clients cannot poll ingestion; their files are searchable once attached).
        waited = thread_ids[:1] + [row.id for row in rows if v1_files.is_managed(row)]
        pending = 0
        if waited:
            pending = int(
                await session.scalar(
                    select(func.count()).where(
                        orm.VectorStoreFile.vector_store_id.in_(waited),
                        orm.VectorStoreFile.status == "in_progress",
                    )
                )
                or 0
            )
    found = [row.id for row in rows]
    stale = [row.id for row in rows if vector_stores.stale_activity(row)]
    return _Stores([i for i in ids if i in found], thread_ids[0] if thread_ids else None, expired, stale), pending


async def _wait_for_thread_store(runtime: Runtime, run: orm.Run) -> _Stores:
    """Short polls, bounded: the worker ingests the thread's files meanwhile."""
    deadline = time.monotonic() + THREAD_STORE_WAIT_SECONDS
    while True:
        stores, pending = await _stores(runtime, run)
        if not pending or stores.expired or time.monotonic() >= deadline:
            return stores
        runtime.wake()
        await asyncio.sleep(WAIT_POLL_SECONDS)


async def _turn(session: Any, run: orm.Run) -> int:
    """The tool step's number in the run: unique within the run's markers."""
    count = await session.scalar(
        select(func.count()).where(orm.RunStep.run_id == run.id, orm.RunStep.type == "tool_calls")
    )
    return int(count or 0)


def _result(
    call_id: str, ranking_options: dict[str, Any], turn: int, hits: list[tuple[Any, orm.VectorStoreFile]]
) -> FileSearchResult:
    results, blocks, citations = [], [], {}
    for position, (hit, row) in enumerate(hits):
        marker = f"【{turn}:{position}†{row.filename}】"
        citations[marker] = row.file_id
        blocks.append(f"{marker}\n{hit.text}")
        results.append(
            {
                "file_id": row.file_id,
                "file_name": row.filename,
                "score": round(hit.score, 6),
                "content": [{"type": "text", "text": hit.text}],
            }
        )
    call = {
        "id": call_id,
        "type": "file_search",
        "file_search": {"ranking_options": ranking_options, "results": results},
    }
    output = "\n\n".join(blocks) if blocks else "No results found in the files."
    return FileSearchResult(call=call, output=output, citations=citations)


def _annotate(part: dict[str, Any], citations: dict[str, str]) -> dict[str, Any]:
    if part.get("type") != "text":
        return part
    value = part["text"]["value"]
    annotations = list(part["text"].get("annotations") or [])
    for match in _MARKER.finditer(value):
        file_id = citations.get(match.group())
        if file_id is not None:
            annotations.append(
                {
                    "type": "file_citation",
                    "text": match.group(),
                    "file_citation": {"file_id": file_id},
                    "start_index": match.start(),
                    "end_index": match.end(),
                }
            )
    annotations.sort(key=lambda item: item["start_index"])
    return {**part, "text": {"value": value, "annotations": annotations}}
