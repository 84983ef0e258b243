"""How the keyword and the vector ranking are merged (hybrid search).

Reciprocal rank fusion: a chunk scores the sum over the lists of
1 / (RRF_K + its rank). RRF_K sets how much the head of each list dominates;
the usual 60 flattens it. On the development split of bench/retrieval.py
(BM25 with minilm-static vectors) k = 5-10 ranked best (dev MRR@10 0.74
against 0.73 at 60 and 0.65 for BM25 alone); 10 is used.
"""

from __future__ import annotations

from collections.abc import Sequence

from app.retrieval.index import Hit

RRF_K = 10


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
