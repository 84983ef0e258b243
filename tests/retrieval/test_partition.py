"""The partitioned (IVF) scan of SQLite's cached vector matrix: on a
synthetic clustered set, it finds nearly all of the exact top-k, with exact
scores, and a filter never lets a failing row through or leaves a page short."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.retrieval import embed, filters, index, partition, vectors
from app.runtime import Runtime
from app.settings import Settings
from app.wire.vector_stores import ComparisonFilter

pytestmark = pytest.mark.timeout(60)

ROWS = 6000
DIMENSIONS = 64
TOPICS = 80
FILES = 300


def _unit(matrix: Any) -> Any:
    return (matrix / np.linalg.norm(matrix, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def matrices() -> tuple[Any, Any, Any]:
    """(exact matrix, partitioned matrix, queries): rows drawn around topic
    centres, as chunks of documents on a topic are; queries near a topic."""
    rng = np.random.default_rng(7)
    centres = _unit(rng.standard_normal((TOPICS, DIMENSIONS)))
    rows = _unit(centres[rng.integers(TOPICS, size=ROWS)] + 0.6 * rng.standard_normal((ROWS, DIMENSIONS)) / 8)
    files = np.asarray([f"file-{n:03d}" for n in range(FILES)], dtype=object)
    exact = vectors._Matrix(
        1, np.arange(ROWS, dtype=np.int64) + 1000, rng.integers(FILES, size=ROWS).astype(np.int32), files, rows
    )
    queries = _unit(centres[rng.integers(TOPICS, size=60)] + 0.8 * rng.standard_normal((60, DIMENSIONS)) / 8)
    return exact, vectors._partitioned(_copy(exact), None), queries


def _copy(matrix: Any) -> Any:
    """_partitioned reorders the rows in place."""
    return vectors._Matrix(
        matrix.version, matrix.ids.copy(), matrix.file_codes.copy(), matrix.file_names, matrix.vectors.copy()
    )


def _top(matrix: Any, query: Any, limit: int, passing: Any = None) -> dict[int, float]:
    """The scan's best rows; ``passing`` is a bool per file of the matrix."""
    rows, scores = vectors._scan(matrix, query, None if passing is None else passing[matrix.file_codes], limit)
    best = np.argsort(-scores, kind="stable")[:limit]
    return {int(matrix.ids[rows[i]]): float(scores[i]) for i in best if scores[i] != -np.inf}


def test_every_row_is_in_exactly_one_list_nearest_its_centroid(matrices: tuple[Any, Any, Any]) -> None:
    exact, partitioned, _ = matrices
    index = partitioned.partition
    assert index is not None and len(index.centroids) == partition.list_count(ROWS)
    assert index.offsets[0] == 0 and index.offsets[-1] == ROWS and (np.diff(index.offsets) >= 0).all()
    assert sorted(partitioned.ids.tolist()) == sorted(exact.ids.tolist())
    labels = partition.assign(partitioned.vectors, index.centroids)
    assert (np.diff(labels) >= 0).all()  # rows grouped by list, in list order
    # Rows kept their chunk id and file through the reordering.
    where = {int(chunk_id): n for n, chunk_id in enumerate(exact.ids)}
    for n in range(0, ROWS, 97):
        original = where[int(partitioned.ids[n])]
        assert np.array_equal(partitioned.vectors[n], exact.vectors[original])
        assert partitioned.file_codes[n] == exact.file_codes[original]


def test_the_scan_finds_nearly_all_of_the_exact_top_k_with_exact_scores(matrices: tuple[Any, Any, Any]) -> None:
    exact, partitioned, queries = matrices
    recalls = []
    for query in queries:
        truth, found = _top(exact, query, 10), _top(partitioned, query, 10)
        assert len(found) == 10
        for chunk_id, score in found.items():  # a returned row carries its exact cosine
            row = int(np.flatnonzero(exact.ids == chunk_id)[0])
            assert score == pytest.approx(float(exact.vectors[row] @ query), abs=1e-5)
        recalls.append(len(truth.keys() & found.keys()) / 10)
    assert np.mean(recalls) >= 0.95
    # It scanned a small part of the store, not all of it.
    rows, _ = vectors._scan(partitioned, queries[0], None, 10)
    assert len(rows) < ROWS / 4


def test_a_filter_never_lets_a_failing_row_through_nor_leaves_a_page_short(matrices: tuple[Any, Any, Any]) -> None:
    exact, partitioned, queries = matrices
    for chosen, exactly in ((np.arange(0, FILES, 3), False), (np.array([3, 150]), True)):
        passing = np.zeros(FILES, dtype=bool)
        passing[chosen] = True  # a third of the files; two files of 300 (~40 rows, in many lists)
        allowed = {int(c) for c, code in zip(exact.ids, exact.file_codes, strict=True) if passing[code]}
        recalls = []
        for query in queries:
            truth, found = _top(exact, query, 10, passing), _top(partitioned, query, 10, passing)
            assert set(found) <= allowed and len(found) == 10
            recalls.append(len(truth.keys() & found.keys()) / 10)
        # A filter leaving fewer rows than a probe scans is answered exactly.
        assert np.mean(recalls) == 1.0 if exactly else np.mean(recalls) >= 0.95


def test_centroids_are_reused_until_the_store_doubles_or_halves(matrices: tuple[Any, Any, Any]) -> None:
    exact, partitioned, _ = matrices
    index = partitioned.partition
    assert index is not None
    assert not partition.worth_retraining(index, ROWS + 10) and partition.worth_retraining(index, ROWS * 3)
    grown = vectors._Matrix(2, exact.ids[:-5], exact.file_codes[:-5], exact.file_names, exact.vectors[:-5].copy())
    again = vectors._partitioned(grown, index)
    assert again.partition is not None and np.array_equal(again.partition.centroids, index.centroids)
    assert again.partition.offsets[-1] == ROWS - 5


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # PostgreSQL searches with pgvector's HNSW index
async def test_a_large_store_is_searched_through_its_partition(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.retrieval.test_search_index import _add_file, _store

    started = await Runtime.start(Settings(data_dir=tmp_path / "data", database_url=database_url))
    try:
        animals = ["zebra", "llama", "okapi", "gecko", "heron", "bison", "otter", "tapir", "lemur", "koala"]
        pieces = [f"{animal} note {n}: the {animal} eats, sleeps and roams" for animal in animals for n in range(16)]
        store_id, _ = await _store(started, [(pieces[:80], {"half": 1}), (pieces[80:], {"half": 2})], embedded=True)
        monkeypatch.setattr(partition, "MIN_ROWS", 100)
        query = embed.HashingEmbedder().vector("where does the okapi sleep")

        async def nearest(condition: filters.Compiled | None = None) -> list[tuple[float, int]]:
            async with started.transaction() as session:
                hits = await vectors.nearest(session, index.Scope([store_id], condition), query, 10)
            assert all(0.0 <= hit.score <= 1.0 for hit in hits)
            return [(hit.score, hit.chunk_id) for hit in hits]

        vectors._cache.clear()
        partitioned = await nearest()
        assert vectors._cache[store_id].partition is not None
        half = filters.compile_filter(ComparisonFilter(type="eq", key="half", value=1), "sqlite")
        assert len(await nearest(half)) == 10
        monkeypatch.setattr(partition, "MIN_ROWS", 10**9)
        vectors._cache.clear()
        exact = await nearest()
        assert vectors._cache[store_id].partition is None
        # The same ranking (near-ties may swap: the products' rounding differs by a few ulps).
        assert np.allclose([score for score, _ in partitioned], [score for score, _ in exact], atol=1e-6)
        await _add_file(started, store_id, ["where does the okapi sleep"], {}, embedded=True)
        monkeypatch.setattr(partition, "MIN_ROWS", 100)
        newest = await nearest()  # a changed store is read and partitioned again, the new chunk seen
        assert vectors._cache[store_id].partition is not None and newest[0][1] not in {chunk for _, chunk in exact}
    finally:
        vectors._cache.clear()
        await started.close()


def test_rows_are_permuted_in_place() -> None:
    rng = np.random.default_rng(3)
    matrix = rng.standard_normal((500, 8)).astype(np.float32)
    for order in (rng.permutation(500), np.arange(500), np.roll(np.arange(500), 1)):
        expected = matrix[order]
        partition.permute_rows(matrix, order)
        assert np.array_equal(matrix, expected)
        matrix = expected.copy()
