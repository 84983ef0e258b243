"""Ranking: keyword search as the floor, hybrid (keyword + vector, fused by
reciprocal rank) when embeddings exist. Shared by POST
/vector_stores/{id}/search and the file_search tool.

The caller embeds the queries first (a model call, possibly remote) and only
then opens the short database session this runs in.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncSession

from app.retrieval import index, vectors
from app.retrieval.filters import Compiled
from app.retrieval.index import Hit, Scope

RRF_K = 60
# Each ranked list contributes candidates beyond the page, so fusion can
# promote a chunk that one list ranks low and the other high.
CANDIDATE_FACTOR = 4
MIN_CANDIDATES = 40


def fuse(lists: Sequence[Sequence[Hit]], limit: int) -> list[Hit]:
    """Reciprocal rank fusion, scaled into 0..1 (1 = first in every list)."""
    if len(lists) == 1:
        return list(lists[0])[:limit]
    scores: dict[int, float] = {}
    hits: dict[int, Hit] = {}
    for ranked in lists:
        for rank, hit in enumerate(ranked):
            scores[hit.chunk_id] = scores.get(hit.chunk_id, 0.0) + 1.0 / (RRF_K + rank + 1)
            hits.setdefault(hit.chunk_id, hit)
    best = len(lists) / (RRF_K + 1)
    order = sorted(scores, key=lambda chunk_id: -scores[chunk_id])[:limit]
    return [Hit(**{**hits[c].__dict__, "score": min(1.0, scores[c] / best)}) for c in order]


async def search(
    session: AsyncSession,
    store_ids: Sequence[str],
    queries: Sequence[str],
    limit: int,
    *,
    score_threshold: float = 0.0,
    condition: Compiled | None = None,
    query_vectors: Sequence[Sequence[float]] | None = None,
) -> list[Hit]:
    """The best ``limit`` chunks over all queries, each chunk once; only
    chunks of files whose row passes ``condition`` (a compiled filter)."""
    scope = Scope(store_ids, condition)
    candidates = max(MIN_CANDIDATES, limit * CANDIDATE_FACTOR)
    best: dict[int, Hit] = {}
    for position, query in enumerate(queries):
        lists = [await index.keyword_search(session, scope, query, candidates)]
        if query_vectors is not None:
            lists.append(await vectors.nearest(session, scope, query_vectors[position], candidates))
        for hit in fuse(lists, candidates):
            if hit.chunk_id not in best or best[hit.chunk_id].score < hit.score:
                best[hit.chunk_id] = hit
    ranked = sorted(best.values(), key=lambda hit: (-hit.score, hit.chunk_id))
    return [hit for hit in ranked if hit.score >= score_threshold][:limit]
