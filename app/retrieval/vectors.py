"""Nearest chunks by embedding (cosine similarity).

PostgreSQL: pgvector's ``<=>`` operator (the HNSW index serves 384-dimension
vectors; other sizes are scanned exactly), with pgvector 0.8's iterative
index scan so that a store or attribute filter applied after the index still
yields a full page. SQLite: a store's vectors are read once into a normalised
float32 matrix (numpy; float16 halves the memory but numpy multiplies it
~30x slower, no BLAS) and kept in a per-process cache bounded in bytes
(``set_cache_budget``, from the ``vector_cache_mib`` setting; least recently
used stores leave first; a store larger than the whole budget is searched
from a matrix read for that query alone). Whether a cached matrix is still
current is one indexed row: the store's chunk version, bumped by triggers on
every chunk insert and delete (migration 0011) in the same transaction, so
another process's ingestion or deletion is seen by the next search. (It used
to be count/max/sum over the store's chunk ids: ~18 ms at 100k chunks.)
A store of MIN_ROWS chunks or more is clustered when its matrix is read
(app/retrieval/partition.py) and a search scans the nearest few percent of
it, with exact scores: ~10x less than the full product at 100k chunks.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.retrieval import cache_budget, partition
from app.retrieval.index import Hit, Scope, _is_postgres, _vector_literal
from app.retrieval.partition import Partition
from app.retrieval.passing_files import PassingFiles

INDEXED_DIMENSIONS = 384
# Candidates the HNSW scan gathers before filtering (pgvector's hnsw.ef_search;
# iterative scanning goes on past it while filtered rows leave fewer than asked).
EF_SEARCH = 100
_LOAD_BATCH = 4096
_MASKS_PER_MATRIX = 4


@dataclass
class _Matrix:
    version: int
    ids: Any  # int64 chunk ids
    file_codes: Any  # int32 index into file_names, per chunk
    file_names: Any  # object array of the distinct file ids
    vectors: Any  # float32, rows normalised (grouped by list when partitioned)
    partition: Partition | None = None  # large stores only (app/retrieval/partition.py)
    # Per filter fill (PassingFiles.token): which rows pass, a bool per row.
    # A few are kept (a byte per row each, beside ~1.5 KB per row of vectors).
    _masks: OrderedDict[int, Any] = field(default_factory=OrderedDict, repr=False)
    _code_of: dict[str, int] | None = field(default=None, repr=False)

    def rows_passing(self, passing: PassingFiles) -> Any:
        """A bool per row: whether its file is among the passing ones (built
        once per matrix and passing set: a dict lookup per passing file and
        one gather, instead of a set test per file of the store)."""
        mask = self._masks.get(passing.token)
        if mask is not None:
            self._masks.move_to_end(passing.token)
            return mask
        if self._code_of is None:
            self._code_of = {str(name): code for code, name in enumerate(self.file_names)}
        files = np.zeros(len(self.file_names), dtype=bool)
        files[[code for name in passing.file_ids if (code := self._code_of.get(name)) is not None]] = True
        mask = files[self.file_codes]
        self._masks[passing.token] = mask
        while len(self._masks) > _MASKS_PER_MATRIX:
            self._masks.popitem(last=False)
        return mask

    @property
    def nbytes(self) -> int:
        index = self.partition.nbytes if self.partition is not None else 0
        return int(self.ids.nbytes + self.file_codes.nbytes + self.vectors.nbytes) + 64 * len(self.file_names) + index


_cache: OrderedDict[str, _Matrix] = OrderedDict()


def set_cache_budget(limit: int) -> None:
    """Bytes the SQLite vector cache may hold (the Runtime sets it from its
    settings through cache_budget, without importing this module)."""
    cache_budget.set_limit(limit)
    _evict()


def cached_bytes() -> int:
    return sum(matrix.nbytes for matrix in _cache.values())


def _evict() -> None:
    while _cache and cached_bytes() > cache_budget.limit():
        _cache.popitem(last=False)


def _normalised(matrix: Any) -> Any:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return matrix / norms


async def nearest(
    session: AsyncSession, scope: Scope, vector: Sequence[float], limit: int, *, with_texts: bool = True
) -> list[Hit]:
    """The ``limit`` chunks nearest the vector; without ``with_texts`` their
    text is left empty (hybrid search reads the texts of its final page only:
    each ranked list would otherwise read ``limit`` chunks of ~3 KB)."""
    if not scope.store_ids:
        return []
    if _is_postgres(session):
        return await _pgvector(session, scope, vector, limit, with_texts)
    query = _normalised(np.asarray([vector], dtype=np.float32))[0]
    scored: list[tuple[float, int, str, str]] = []
    for store_id in scope.store_ids:
        matrix = await _store_matrix(session, store_id)
        if matrix is None or matrix.vectors.shape[1] != query.shape[0]:
            continue
        passing_rows = None
        if scope.condition is not None:
            # Read once, shared with the keyword side.
            passing_rows = matrix.rows_passing(await scope.passing(session, store_id))
        rows, scores = _scan(matrix, query, passing_rows, limit)
        top = np.argpartition(scores, -limit)[-limit:] if len(scores) > limit else np.arange(len(scores))
        scored.extend(
            (float(scores[i]), int(matrix.ids[rows[i]]), store_id, str(matrix.file_names[matrix.file_codes[rows[i]]]))
            for i in top
        )
    scored = [item for item in scored if item[0] != -np.inf]
    scored.sort(key=lambda item: (-item[0], item[1]))
    best = scored[:limit]
    texts = await texts_of(session, [chunk_id for _, chunk_id, _, _ in best]) if with_texts else {}
    return [Hit(c, s, f, texts.get(c, ""), max(0.0, min(1.0, score))) for score, c, s, f in best]


def _product(vectors: Any, query: Any) -> Any:
    # einsum, not BLAS: a matrix-vector product is bound by memory
    # bandwidth, and OpenBLAS hands it to its threads, which on a busy
    # machine wait to be scheduled: 8-30 ms for a 2.9k-chunk store whose
    # product takes 0.05 ms, and a slower median at 100k (22 vs 14 ms).
    return np.einsum("ij,j->i", vectors, query)


def _scan(matrix: _Matrix, query: Any, passing_rows: Any, limit: int) -> tuple[Any, Any]:
    """(row numbers, their exact scores; -inf for rows the filter excludes).

    A small store: every row. A partitioned one: the rows of the lists
    nearest the query until PROBE_FRACTION of the store (of the rows that
    pass the filter, if any) and ``limit`` passing rows have been seen. A
    filter that leaves no more rows than such a probe would scan is answered
    exactly from those rows alone: probing lists for a few scattered rows
    would scan much of the store and still miss some."""
    if matrix.partition is None:
        scores = _product(matrix.vectors, query)
        if passing_rows is not None:
            scores = np.where(passing_rows, scores, -np.inf)
        return np.arange(len(scores)), scores
    enough = partition.PROBE_FRACTION * len(matrix.ids)
    if passing_rows is not None:
        total = int(passing_rows.sum())
        if total <= max(enough, limit):
            rows = np.flatnonzero(passing_rows)
            return rows, _product(matrix.vectors[rows], query)
        enough = partition.PROBE_FRACTION * total
    row_parts: list[Any] = []
    score_parts: list[Any] = []
    passed = 0
    for start, end in matrix.partition.ranges(query):
        scores = _product(matrix.vectors[start:end], query)
        if passing_rows is None:
            passed += end - start
        else:
            ok = passing_rows[start:end]
            passed += int(ok.sum())
            scores = np.where(ok, scores, -np.inf)
        row_parts.append(np.arange(start, end))
        score_parts.append(scores)
        if len(row_parts) >= partition.MIN_PROBES and passed >= max(enough, limit):
            break
    return np.concatenate(row_parts), np.concatenate(score_parts)


async def _store_matrix(session: AsyncSession, store_id: str) -> _Matrix | None:
    row = (
        await session.execute(
            text("SELECT version FROM vector_store_chunk_versions WHERE vector_store_id = :store"),
            {"store": store_id},
        )
    ).first()
    if row is None:
        return None  # no chunk was ever added
    version = int(row[0])
    cached = _cache.get(store_id)
    if cached is not None and cached.version == version:
        _cache.move_to_end(store_id)
        return cached
    _cache.pop(store_id, None)
    previous = cached.partition if cached is not None else None
    matrix = await _read_matrix(session, store_id, version, previous)
    if matrix is None:
        return None
    if matrix.nbytes <= cache_budget.limit():
        _cache[store_id] = matrix
        _evict()
    return matrix


async def _read_matrix(
    session: AsyncSession, store_id: str, version: int, previous: Partition | None = None
) -> _Matrix | None:
    """The store's vectors, streamed in batches into one preallocated array and
    normalised in place: the peak is about the matrix itself (reading all rows
    at once, then joining and converting them, peaked at ~4x)."""
    capacity = int(
        (
            await session.execute(
                text("SELECT count(*) FROM vector_store_chunks WHERE vector_store_id = :store"), {"store": store_id}
            )
        ).scalar_one()
    )
    result = await session.stream(
        text(
            "SELECT id, file_id, embedding FROM vector_store_chunks "
            "WHERE vector_store_id = :store AND embedding IS NOT NULL"
        ),
        {"store": store_id},
    )
    ids = np.empty(capacity, dtype=np.int64)
    files: list[str] = []
    vectors: Any = None
    filled = 0
    async for fetched in result.partitions(_LOAD_BATCH):
        if vectors is None:
            vectors = np.empty((capacity, len(fetched[0].embedding) // 4), dtype=np.float32)
        rows = [r for r in fetched if len(r.embedding) == vectors.shape[1] * 4][: capacity - filled]
        batch = np.frombuffer(b"".join(r.embedding for r in rows), dtype="<f4").reshape(len(rows), vectors.shape[1])
        vectors[filled : filled + len(rows)] = batch
        ids[filled : filled + len(rows)] = [r.id for r in rows]
        files.extend(r.file_id for r in rows)
        filled += len(rows)
    if vectors is None or filled == 0:
        return None
    vectors = vectors[:filled]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    vectors /= norms
    file_names, file_codes = np.unique(np.asarray(files, dtype=object), return_inverse=True)
    matrix = _Matrix(version, ids[:filled], file_codes.astype(np.int32), file_names, vectors)
    if filled < partition.MIN_ROWS or matrix.nbytes > cache_budget.limit():
        return matrix  # small, or read for this search alone: a full product costs less than clustering
    # Clustering a large store takes about a second: off the event loop.
    return await asyncio.to_thread(_partitioned, matrix, previous)


def _partitioned(matrix: _Matrix, previous: Partition | None) -> _Matrix:
    """The matrix with its rows grouped by list (the store's previous
    centroids are reused unless its size changed past worth_retraining).
    The rows are reordered in place: ``matrix`` is consumed."""
    rows = len(matrix.ids)
    if previous is not None and partition.worth_retraining(previous, rows):
        previous = None
    order, index = (
        partition.build(matrix.vectors, previous.centroids, previous.trained_rows)
        if previous is not None
        else partition.build(matrix.vectors)
    )
    partition.permute_rows(matrix.vectors, order)
    return _Matrix(
        matrix.version, matrix.ids[order], matrix.file_codes[order], matrix.file_names, matrix.vectors, index
    )


async def texts_of(session: AsyncSession, chunk_ids: list[int]) -> dict[int, str]:
    if not chunk_ids:
        return {}
    statement = text("SELECT id, text FROM vector_store_chunks WHERE id IN :ids").bindparams(
        bindparam("ids", expanding=True)
    )
    return {int(r.id): str(r.text) for r in (await session.execute(statement, {"ids": chunk_ids})).all()}


async def _pgvector(
    session: AsyncSession, scope: Scope, vector: Sequence[float], limit: int, with_texts: bool
) -> list[Hit]:
    params: dict[str, object] = {**scope.params(), "limit": limit, "query": _vector_literal(vector)}
    # The HNSW index is on the expression embedding::vector(384) for rows of
    # that size; the query must use the same expression to be served by it.
    column = "c.embedding::vector(384)" if len(vector) == INDEXED_DIMENSIONS else "c.embedding"
    distance = f"{column} <=> CAST(:query AS vector({len(vector)}))"
    text_column = "c.text" if with_texts else "''"
    sql = (
        f"SELECT c.id, c.vector_store_id, c.file_id, {text_column} AS text, 1 - ({distance}) AS score "  # noqa: S608 (constant fragments only; values are bound)
        f"FROM vector_store_chunks c WHERE vector_dims(c.embedding) = {len(vector)} "
        f"AND {scope.sql()} ORDER BY {distance} LIMIT :limit"
    )
    # The store and filter conditions are checked on the rows the HNSW scan
    # yields; scanning on in exact order until ``limit`` rows pass (rather than
    # stopping after ef_search candidates) keeps a filtered page full.
    await session.execute(text("SET LOCAL hnsw.iterative_scan = strict_order"))
    await session.execute(text(f"SET LOCAL hnsw.ef_search = {max(EF_SEARCH, min(limit, 1000))}"))
    rows = (await session.execute(text(sql).bindparams(bindparam("stores", expanding=True)), params)).all()
    return [Hit(r.id, r.vector_store_id, r.file_id, r.text, max(0.0, min(1.0, float(r.score)))) for r in rows]
