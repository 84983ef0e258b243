"""Nearest chunks by embedding (cosine similarity).

PostgreSQL: pgvector's ``<=>`` operator (the HNSW index serves 384-dimension
vectors; other sizes are scanned exactly). SQLite: a store's vectors are read
once into a normalised float32 matrix (numpy) and kept in a small per-process
cache; a cheap fingerprint query (count, max and sum of chunk ids) tells when
the store changed and the matrix must be read again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncSession

from app.retrieval.index import Hit, Scope, _is_postgres, _vector_literal

INDEXED_DIMENSIONS = 384
CACHED_STORES = 8


@dataclass
class _Matrix:
    fingerprint: tuple[int, int, int]
    ids: Any  # int64 chunk ids
    file_codes: Any  # int32 index into file_names, per chunk
    file_names: Any  # object array of the distinct file ids
    vectors: Any  # float32, rows normalised


_cache: OrderedDict[str, _Matrix] = OrderedDict()


def _normalised(matrix: Any) -> Any:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return matrix / norms


async def nearest(session: AsyncSession, scope: Scope, vector: Sequence[float], limit: int) -> list[Hit]:
    if not scope.store_ids:
        return []
    if _is_postgres(session):
        return await _pgvector(session, scope, vector, limit)
    query = _normalised(np.asarray([vector], dtype=np.float32))[0]
    scored: list[tuple[float, int, str, str]] = []
    for store_id in scope.store_ids:
        matrix = await _store_matrix(session, store_id)
        if matrix is None or matrix.vectors.shape[1] != query.shape[0]:
            continue
        scores = matrix.vectors @ query
        if scope.condition is not None:
            allowed = await _allowed_files(session, store_id, scope)
            passing = np.fromiter(
                (name in allowed for name in matrix.file_names), dtype=bool, count=len(matrix.file_names)
            )
            scores = np.where(passing[matrix.file_codes], scores, -np.inf)
        top = np.argpartition(-scores, limit)[:limit] if len(scores) > limit else np.arange(len(scores))
        scored.extend(
            (float(scores[i]), int(matrix.ids[i]), store_id, str(matrix.file_names[matrix.file_codes[i]])) for i in top
        )
    scored = [item for item in scored if item[0] != -np.inf]
    scored.sort(key=lambda item: (-item[0], item[1]))
    best = scored[:limit]
    texts = await _texts(session, [chunk_id for _, chunk_id, _, _ in best])
    return [Hit(c, s, f, texts.get(c, ""), max(0.0, min(1.0, score))) for score, c, s, f in best]


async def _allowed_files(session: AsyncSession, store_id: str, scope: Scope) -> set[str]:
    """Files of the store whose row passes the scope's filter (one query over file rows, not chunks)."""
    assert scope.condition is not None
    statement = text(
        f"SELECT f.file_id FROM vector_store_files f WHERE f.vector_store_id = :store AND f.status = 'completed' "  # noqa: S608 (the condition is compiled with bound values)
        f"AND {scope.condition.sql}"
    )
    return set((await session.execute(statement, {"store": store_id, **scope.condition.params})).scalars())


async def _store_matrix(session: AsyncSession, store_id: str) -> _Matrix | None:
    row = (
        await session.execute(
            text(
                # Over the (vector_store_id, file_id) index only: no row is read.
                "SELECT count(*), coalesce(max(id), 0), coalesce(sum(id), 0) FROM vector_store_chunks "
                "WHERE vector_store_id = :store"
            ),
            {"store": store_id},
        )
    ).one()
    fingerprint = (int(row[0]), int(row[1]), int(row[2]))
    if fingerprint[0] == 0:
        return None
    cached = _cache.get(store_id)
    if cached is not None and cached.fingerprint == fingerprint:
        _cache.move_to_end(store_id)
        return cached
    rows = (
        await session.execute(
            text(
                "SELECT id, file_id, embedding FROM vector_store_chunks "
                "WHERE vector_store_id = :store AND embedding IS NOT NULL"
            ),
            {"store": store_id},
        )
    ).all()
    if not rows:
        return None
    width = len(rows[0].embedding) // 4
    rows = [r for r in rows if len(r.embedding) == width * 4]
    vectors = np.frombuffer(b"".join(r.embedding for r in rows), dtype="<f4").reshape(len(rows), width)
    file_names, file_codes = np.unique(np.asarray([r.file_id for r in rows], dtype=object), return_inverse=True)
    matrix = _Matrix(
        fingerprint,
        np.asarray([r.id for r in rows], dtype=np.int64),
        file_codes.astype(np.int32),
        file_names,
        _normalised(vectors.astype(np.float32)),
    )
    _cache[store_id] = matrix
    while len(_cache) > CACHED_STORES:
        _cache.popitem(last=False)
    return matrix


async def _texts(session: AsyncSession, chunk_ids: list[int]) -> dict[int, str]:
    if not chunk_ids:
        return {}
    statement = text("SELECT id, text FROM vector_store_chunks WHERE id IN :ids").bindparams(
        bindparam("ids", expanding=True)
    )
    return {int(r.id): str(r.text) for r in (await session.execute(statement, {"ids": chunk_ids})).all()}


async def _pgvector(session: AsyncSession, scope: Scope, vector: Sequence[float], limit: int) -> list[Hit]:
    params: dict[str, object] = {**scope.params(), "limit": limit, "query": _vector_literal(vector)}
    # The HNSW index is on the expression embedding::vector(384) for rows of
    # that size; the query must use the same expression to be served by it.
    column = "c.embedding::vector(384)" if len(vector) == INDEXED_DIMENSIONS else "c.embedding"
    distance = f"{column} <=> CAST(:query AS vector({len(vector)}))"
    sql = (
        f"SELECT c.id, c.vector_store_id, c.file_id, c.text, 1 - ({distance}) AS score "  # noqa: S608 (constant fragments only; values are bound)
        f"FROM vector_store_chunks c WHERE vector_dims(c.embedding) = {len(vector)} "
        f"AND {scope.sql()} ORDER BY {distance} LIMIT :limit"
    )
    rows = (await session.execute(text(sql).bindparams(bindparam("stores", expanding=True)), params)).all()
    return [Hit(r.id, r.vector_store_id, r.file_id, r.text, max(0.0, min(1.0, float(r.score)))) for r in rows]
