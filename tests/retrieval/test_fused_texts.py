"""Hybrid search reads chunk texts for its final page only (the vector side
returns none): every hit still carries its chunk's own text, on both
databases, whichever list and query found it."""

from __future__ import annotations

import pytest

from app.retrieval import embed
from app.retrieval import search as ranking
from app.runtime import Runtime
from tests.retrieval.test_search_index import _store

pytestmark = pytest.mark.timeout(120)

PIECES = {
    "zebras sleep standing in the savanna": {},
    "llamas hum in the andes": {},
    "okapis browse the ituri forest at dawn": {},
    "herons wait motionless in shallow water": {},
}


async def test_every_fused_hit_carries_its_chunk_text(runtime: Runtime) -> None:
    store_id, _ = await _store(runtime, [([text], attributes) for text, attributes in PIECES.items()], embedded=True)
    # "zebbras savana": vectors only (misspelt); "llamas": both lists; "okapi": keywords
    # for one query and, misspelt in the other, vectors only.
    queries = ["zebbras savana", "llamas andes", "okapis ituri", "okappis iturri"]
    vectors = await embed.HashingEmbedder().embed(queries)
    async with runtime.transaction() as session:
        hits = await ranking.search(session, [store_id], queries, 10, query_vectors=vectors)
    assert {hit.text for hit in hits} == set(PIECES)
    async with runtime.transaction() as session:
        alone = await ranking.search(session, [store_id], ["zebbras savana"], 1, query_vectors=vectors[:1])
    assert [hit.text for hit in alone] == ["zebras sleep standing in the savanna"]
