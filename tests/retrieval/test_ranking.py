"""Ranking pieces: query terms, reciprocal rank fusion, the hashing embedder, filters."""

from __future__ import annotations

import math

from app.retrieval import embed, index
from app.retrieval.fusion import fuse
from app.retrieval.index import Hit
from app.services.vector_store_search import matches
from app.wire.vector_stores import ComparisonFilter, CompoundFilter


def _hit(chunk_id: int, score: float = 0.5) -> Hit:
    return Hit(chunk_id, "vs_a", f"file-{chunk_id}", f"text {chunk_id}", score)


def test_terms_drop_operators_and_duplicates() -> None:
    assert index.terms('"Zebras" OR zebras -NEAR(sleep*) AND: ünïcode') == ["zebras", "near", "sleep", "ünïcode"]
    assert index.terms("how to do it") == ["how", "to", "do", "it"]


def test_fusion_rewards_agreement_and_stays_in_range() -> None:
    keyword = [_hit(1), _hit(2), _hit(3)]
    vector = [_hit(3), _hit(1), _hit(4)]
    fused = fuse([keyword, vector], limit=10)
    assert [hit.chunk_id for hit in fused][:2] == [1, 3]
    assert all(0 < hit.score <= 1 for hit in fused)
    assert fuse([[_hit(9)], [_hit(9)]], limit=1)[0].score == 1.0
    assert fuse([keyword], limit=2) == keyword[:2]


async def test_hashing_embedder_is_deterministic_and_normalised() -> None:
    model = embed.HashingEmbedder()
    first, again, other = await model.embed(["zebras sleep standing", "zebras sleep standing", "the stock market"])
    assert first == again and len(first) == embed.DIMENSIONS
    assert math.isclose(sum(v * v for v in first), 1.0, rel_tol=1e-6)
    similar = sum(a * b for a, b in zip(first, model.vector("a zebra sleeping"), strict=True))
    unrelated = sum(a * b for a, b in zip(first, other, strict=True))
    assert similar > unrelated


def test_filters() -> None:
    attributes = {"region": "africa", "year": 2020, "wild": True}
    assert matches(ComparisonFilter(type="eq", key="region", value="africa"), attributes)
    assert not matches(ComparisonFilter(type="gt", key="region", value=3), attributes)
    assert matches(ComparisonFilter(type="lte", key="year", value=2020), attributes)
    assert not matches(ComparisonFilter(type="eq", key="missing", value=1), attributes)
    assert matches(ComparisonFilter(type="ne", key="missing", value=1), attributes)
    either = CompoundFilter(
        type="or",
        filters=[
            ComparisonFilter(type="eq", key="wild", value=False),
            ComparisonFilter(type="in", key="year", value=[2020]),
        ],
    )
    assert matches(either, attributes)
    assert not matches(
        CompoundFilter(type="and", filters=[either, ComparisonFilter(type="nin", key="region", value=["africa"])]),
        attributes,
    )
