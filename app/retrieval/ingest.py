"""Background ingestion of vector store files, driven by the worker's tick.

The vector_store_files row is the job: an ``in_progress`` row without a
live lease is claimed with a compare-and-set UPDATE that stamps a lease (on
PostgreSQL the candidates are locked FOR UPDATE SKIP LOCKED), so two workers
never ingest the same file, and a file whose worker died is claimed again
once its lease lapses. Parsing and chunking run in threads so the event loop
stays free; embedding (if configured) runs with no session open. The result
is committed only if the row is still ours and still ``in_progress`` (a
cancelled batch or a removed file discards the work). A failure marks only
its own file ``failed``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Float, Integer, bindparam, or_, select, update

from app import orm
from app.retrieval import chunking, embed, index, parse
from app.runtime import Runtime

log = logging.getLogger("app.ingest")

# OpenAI's per-file limit.
MAX_FILE_TOKENS = 5_000_000

_FILES = orm.VectorStoreFile
# A file waiting for ingestion whose lease is free; bound: ``now``.
_CLAIMABLE = (_FILES.status == "in_progress") & or_(
    _FILES.lease_expires_at.is_(None), _FILES.lease_expires_at < bindparam("now", type_=Float)
)
# The worker's ingestion claim, built once, as the reaper's reads are
# (issue 17: built on each claim, once a poll interval, it was loop time
# spent building statements, not claiming): the oldest claimable files
# (bound: ``limit``), then each one's lease taken under the same condition.
_CANDIDATES = (
    select(_FILES.vector_store_id, _FILES.file_id)
    .where(_CLAIMABLE)
    .order_by(_FILES.created_at)
    .limit(bindparam("limit", type_=Integer))
    .with_for_update(skip_locked=True)
)
_CLAIM = (
    update(_FILES)
    .where(_FILES.vector_store_id == bindparam("store_id"), _FILES.file_id == bindparam("claimed_file_id"), _CLAIMABLE)
    .values(lease_owner=bindparam("owner"), lease_expires_at=bindparam("lease_until", type_=Float))
    .execution_options(synchronize_session=False)
)
Key = tuple[str, str]  # (vector_store_id, file_id)


@dataclass
class Parsed:
    pieces: list[str]
    usage_bytes: int
    # The document's opening (its title line and first paragraphs):
    # embedders that take it (minilm-static) give every chunk its context.
    head: str = ""


# More than the 256 tokens the transformer reads of a document's head (about
# 1,000-1,500 characters of prose): the tokenizer cuts the rest.
HEAD_CHARS = 4_000


def document_head(text: str, filename: str) -> str:
    """The start of the text (title line first), else the file's name."""
    return text[:HEAD_CHARS].strip() or filename


def parse_and_chunk(path: Any, filename: str, strategy: dict[str, Any]) -> Parsed:
    """CPU-bound part of an ingestion (run in a thread)."""
    text = parse.extract_text(path, filename)
    static = strategy.get("static") or {}
    size = int(static.get("max_chunk_size_tokens", chunking.DEFAULT_MAX_TOKENS))
    overlap = int(static.get("chunk_overlap_tokens", chunking.DEFAULT_OVERLAP_TOKENS))
    pieces = chunking.chunk(text, size, overlap)
    if not pieces:
        raise parse.ParseError("invalid_file", "The file contains no text that could be extracted.")
    if len(pieces) * (size - overlap) > MAX_FILE_TOKENS:
        raise parse.ParseError("invalid_file", f"The file has more than {MAX_FILE_TOKENS} tokens.")
    return Parsed(pieces, sum(len(piece.encode("utf-8")) for piece in pieces), document_head(text, filename))


class Ingestion:
    def __init__(self, runtime: Runtime, owner: str, wake: Callable[[], None], concurrency: int | None = None) -> None:
        self.runtime = runtime
        self.owner = owner
        self.wake = wake
        # Parsing is CPU-bound: about one file per core at a time.
        self.concurrency = concurrency or max(2, os.cpu_count() or 2)
        self.lease_seconds = runtime.settings.run_lease_seconds
        self.tasks: dict[Key, asyncio.Task[None]] = {}

    async def tick(self) -> None:
        free = self.concurrency - len(self.tasks)
        if free <= 0:
            return
        for key in await self.claim(free):
            self.tasks[key] = asyncio.create_task(self._run(key), name=f"ingest {key[1]} into {key[0]}")

    async def stop(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        self.tasks.clear()

    async def claim(self, limit: int) -> list[Key]:
        now = time.time()
        claimed: list[Key] = []
        async with self.runtime.transaction() as session:
            candidates = await session.execute(_CANDIDATES, {"now": now, "limit": limit})
            for store_id, file_id in candidates.all():
                parameters = {
                    "store_id": store_id,
                    "claimed_file_id": file_id,
                    "now": now,
                    "owner": self.owner,
                    "lease_until": now + self.lease_seconds,
                }
                result = await session.execute(_CLAIM, parameters)
                if getattr(result, "rowcount", 0):
                    claimed.append((store_id, file_id))
        return claimed

    async def _run(self, key: Key) -> None:
        renewer = asyncio.create_task(self._renew(key))
        try:
            await self._ingest(key)
        except Exception:
            log.exception("ingesting file %s into %s", key[1], key[0])
            await self._finish(
                key, None, {"code": "server_error", "message": "The server had an error while processing the file."}
            )
        finally:
            renewer.cancel()
            with suppress(asyncio.CancelledError):
                await renewer
            self.tasks.pop(key, None)
            self.wake()

    async def _ingest(self, key: Key) -> None:
        file_id = key[1]
        async with self.runtime.transaction() as session:
            row = await session.get(orm.VectorStoreFile, key)
            if row is None or row.status != "in_progress" or row.lease_owner != self.owner:
                return
            filename, strategy = row.filename, dict(row.chunking_strategy)
        path = self.runtime.storage.path(file_id)
        try:
            parsed = await asyncio.to_thread(parse_and_chunk, path, filename, strategy)
        except parse.ParseError as error:
            await self._finish(key, None, {"code": error.code, "message": error.message})
            return
        except FileNotFoundError:
            await self._finish(
                key, None, {"code": "invalid_file", "message": "The file's content is no longer available."}
            )
            return
        vectors = await self._embed(parsed.pieces, parsed.head)
        await self._finish(key, (parsed, vectors), None)

    async def _embed(self, pieces: list[str], head: str) -> list[list[float]] | None:
        model = embed.embedder(self.runtime.settings)
        if model is None:
            return None
        try:
            return await embed.embed_document(model, pieces, head)
        except Exception:
            # Keyword search still finds the file; say so in the log.
            log.exception("embedding with %s failed; the file is indexed for keyword search only", model.name)
            return None

    async def _finish(
        self, key: Key, result: tuple[Parsed, list[list[float]] | None] | None, error: dict[str, Any] | None
    ) -> None:
        """Commit the outcome if the job is still ours and still wanted."""
        async with self.runtime.transaction() as session:
            row = await session.get(orm.VectorStoreFile, key, with_for_update=True)
            if row is None or row.status != "in_progress" or row.lease_owner != self.owner:
                return  # cancelled, removed or taken over: discard
            await index.remove_chunks(session, key[0], [key[1]])
            if result is not None:
                parsed, vectors = result
                await index.add_chunks(session, key[0], key[1], parsed.pieces, vectors)
                row.status, row.usage_bytes, row.last_error = "completed", parsed.usage_bytes, None
            else:
                row.status, row.last_error = "failed", error
            row.lease_owner, row.lease_expires_at = None, None

    async def _renew(self, key: Key) -> None:
        table = orm.VectorStoreFile
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            async with self.runtime.transaction() as session:
                await session.execute(
                    update(table)
                    .where(table.vector_store_id == key[0], table.file_id == key[1], table.lease_owner == self.owner)
                    .values(lease_expires_at=time.time() + self.lease_seconds)
                    .execution_options(synchronize_session=False)
                )
