"""POST /vector_stores/{id}/search and the store lookups of the file_search tool.

Attribute filters are compiled to SQL (app.retrieval.filters) and applied
inside the chunk query, so a filter never starves the page; only the file
rows of the hits are read. ``matches`` states the same semantics on one row.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app import errors, orm
from app.retrieval import search as ranking
from app.retrieval.filters import Dialect, FilterTooLarge, compile_filter
from app.retrieval.index import Hit
from app.services import vector_stores
from app.services.projects import Project
from app.wire.vector_stores import (
    ComparisonFilter,
    CompoundFilter,
    SearchRequest,
    SearchResult,
    SearchResultsPage,
    TextContent,
)


def _equal(actual: Any, expected: Any) -> bool:
    """Equal values of the same JSON kind (true is not 1)."""
    return isinstance(actual, bool) == isinstance(expected, bool) and bool(actual == expected)


def _compare(op: str, actual: Any, expected: Any) -> bool:
    if op in ("in", "nin"):
        found = isinstance(expected, list) and any(_equal(actual, item) for item in expected)
        return found if op == "in" else not found
    if op == "eq":
        return _equal(actual, expected)
    if op == "ne":
        return not _equal(actual, expected)
    numeric = (int, float)
    comparable = (isinstance(actual, numeric) and isinstance(expected, numeric)) or (
        isinstance(actual, str) and isinstance(expected, str)
    )
    if not comparable or isinstance(actual, bool) or isinstance(expected, bool):
        return False
    return bool(
        {"gt": actual > expected, "gte": actual >= expected, "lt": actual < expected, "lte": actual <= expected}[op]
    )


def matches(condition: ComparisonFilter | CompoundFilter, attributes: dict[str, Any]) -> bool:
    """A missing key satisfies only the negative comparisons (ne, nin)."""
    if isinstance(condition, CompoundFilter):
        results = (matches(item, attributes) for item in condition.filters)
        return all(results) if condition.type == "and" else any(results)
    if condition.key not in attributes:
        return condition.type in ("ne", "nin")
    return _compare(condition.type, attributes[condition.key], condition.value)


async def files_of_hits(session: AsyncSession, hits: Sequence[Hit]) -> dict[tuple[str, str], orm.VectorStoreFile]:
    """The completed file rows of these hits (only those: a store may hold thousands)."""
    keys = {(hit.vector_store_id, hit.file_id) for hit in hits}
    if not keys:
        return {}
    # By primary key; the status is checked here: in the WHERE clause SQLite
    # chose the status index, which holds every completed file of every
    # store (1.5 ms at 11k files).
    rows = (
        await session.scalars(
            select(orm.VectorStoreFile).where(
                orm.VectorStoreFile.vector_store_id.in_({store for store, _ in keys}),
                orm.VectorStoreFile.file_id.in_({file for _, file in keys}),
            )
        )
    ).all()
    return {
        (row.vector_store_id, row.file_id): row
        for row in rows
        if row.status == "completed" and (row.vector_store_id, row.file_id) in keys
    }


def queries_of(body: SearchRequest) -> list[str]:
    return [body.query] if isinstance(body.query, str) else list(body.query)


@dataclass
class StoreSearch:
    page: SearchResultsPage
    # As the search read it: when vector_stores.stale_activity(store), the
    # caller records the use (vector_stores.touch_ids) in a write transaction.
    store: orm.VectorStore


async def search(
    session: AsyncSession,
    project: Project,
    vector_store_id: str,
    body: SearchRequest,
    query_vectors: Sequence[Sequence[float]] | asyncio.Future[list[list[float]] | None] | None,
) -> StoreSearch:
    """Reads only: ``session`` may be a read-only transaction (Runtime.reading)."""
    store = await vector_stores.get_live(session, project, vector_store_id)
    dialect: Dialect = "postgresql" if session.get_bind().dialect.name == "postgresql" else "sqlite"
    try:
        condition = compile_filter(body.filters, dialect) if body.filters is not None else None
    except FilterTooLarge as too_large:
        raise errors.invalid(str(too_large), param="filters") from None
    options = body.ranking_options
    hits = await ranking.search(
        session,
        [store.id],
        queries_of(body),
        body.max_num_results,
        score_threshold=options.score_threshold if options else 0.0,
        condition=condition,
        query_vectors=query_vectors,
    )
    files = await files_of_hits(session, hits)
    page = SearchResultsPage(
        search_query=queries_of(body),
        data=[_result(hit, files) for hit in hits if (hit.vector_store_id, hit.file_id) in files],
    )
    return StoreSearch(page, store)


def _result(hit: Hit, files: dict[tuple[str, str], orm.VectorStoreFile]) -> SearchResult:
    row = files[(hit.vector_store_id, hit.file_id)]
    return SearchResult(
        file_id=hit.file_id,
        filename=row.filename,
        score=round(hit.score, 6),
        attributes=row.attributes or {},
        content=[TextContent(text=hit.text)],
    )
