"""Ranking: keyword search as the floor, hybrid (keyword + vector, fused by
reciprocal rank, app/retrieval/fusion.py) when embeddings exist. Shared by POST
/vector_stores/{id}/search and the file_search tool.

The caller starts embedding the queries first (app.retrieval.embed.
start_query_embedding: a remote model is awaited before the short database
session this runs in opens; an in-process one runs beside the first keyword
query) and passes the future, or vectors already made.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace

from sqlalchemy.ext.asyncio import AsyncSession

from app.retrieval import index
from app.retrieval.filters import Compiled
from app.retrieval.fusion import fuse
from app.retrieval.index import Hit, Scope

# Each ranked list contributes candidates beyond the page, so fusion can
# promote a chunk that one list ranks low and the other high.
CANDIDATE_FACTOR = 4
MIN_CANDIDATES = 40


async def search(
    session: AsyncSession,
    store_ids: Sequence[str],
    queries: Sequence[str],
    limit: int,
    *,
    score_threshold: float = 0.0,
    condition: Compiled | None = None,
    query_vectors: Sequence[Sequence[float]] | asyncio.Future[list[list[float]] | None] | None = None,
) -> list[Hit]:
    """The best ``limit`` chunks over all queries, each chunk once; only
    chunks of files whose row passes ``condition`` (a compiled filter).
    ``query_vectors`` (one per query) may still be computing: awaited after
    the first keyword query."""
    from app.retrieval import vectors  # numpy, imported by the first search rather than by an idle server

    scope = Scope(store_ids, condition)
    candidates = max(MIN_CANDIDATES, limit * CANDIDATE_FACTOR)
    best: dict[int, Hit] = {}
    textless: set[int] = set()  # chunks only the vector side found: their text is read for the page alone
    for position, query in enumerate(queries):
        lists = [await index.keyword_search(session, scope, query, candidates)]
        if isinstance(query_vectors, asyncio.Future):
            query_vectors = await query_vectors
        if query_vectors is not None:
            lists.append(await vectors.nearest(session, scope, query_vectors[position], candidates, with_texts=False))
        with_text = {hit.chunk_id for hit in lists[0]}
        for hit in fuse(lists, candidates):
            if hit.chunk_id not in with_text:
                textless.add(hit.chunk_id)
            if hit.chunk_id not in best or best[hit.chunk_id].score < hit.score:
                # Keep a text already read (fusion keeps the keyword side's hit, which has it).
                text = best[hit.chunk_id].text if hit.chunk_id in best and not hit.text else hit.text
                best[hit.chunk_id] = replace(hit, text=text)
    ranked = sorted(best.values(), key=lambda hit: (-hit.score, hit.chunk_id))
    page = [hit for hit in ranked if hit.score >= score_threshold][:limit]
    missing = [hit.chunk_id for hit in page if hit.chunk_id in textless and not hit.text]
    if not missing:
        return page
    texts = await vectors.texts_of(session, missing)
    return [
        replace(hit, text=texts.get(hit.chunk_id, "")) if hit.chunk_id in textless and not hit.text else hit
        for hit in page
    ]
