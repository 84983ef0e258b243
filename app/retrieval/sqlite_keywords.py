"""Keyword ranking on SQLite: FTS5's bm25() over a bounded candidate set.

bm25() is a real BM25 (IDF, length normalisation; the porter tokenizer stems
and the caller drops stop words), but FTS5 computes it for every row matching
the query, and with OR semantics a question's common words ("file",
"function": in 60% of the chunks of the Python docs) match most of a large
store: ~1 s at 100k chunks. So when the words' document counts together
exceed ``POSTING_BUDGET``, only the rarest words (at least one) select
candidates, and the common ones still add to their score: the match is
``(rare...) AND (common... OR rare...)`` (bm25() then counts the rare words
twice, which on the development questions ranked as well as plain BM25;
leaving the common words out altogether lost a third of the MRR when
simulated at 100k chunks). Below the budget the match is the plain OR of
the words, and the ranking plain BM25.

Document counts come from an fts5vocab table over the index (a temporary
table per connection: nothing in the schema). The index stores porter stems,
which are the word or a prefix of it for nearly all English words, so a
word's count is the largest count among its prefixes down to four letters
shorter; when that guesses wrong it can only overestimate.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncSession

# Rows bm25() may be asked to score per query (about 10-20 ms of FTS5 work).
POSTING_BUDGET = 8_000
_SHORTEST_STEM = 3
_STEM_SUFFIX = 4

_VOCAB = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.vector_store_chunks_vocab "
    "USING fts5vocab(main, vector_store_chunks_fts, row)"
)


def _stems(word: str) -> list[str]:
    shortest = max(_SHORTEST_STEM, len(word) - _STEM_SUFFIX)
    return [word[:end] for end in range(len(word), shortest - 1, -1)] or [word]


async def document_counts(session: AsyncSession, words: Sequence[str]) -> dict[str, int]:
    await session.execute(text(_VOCAB))
    candidates = sorted({stem for word in words for stem in _stems(word)})
    statement = text("SELECT term, doc FROM temp.vector_store_chunks_vocab WHERE term IN :terms").bindparams(
        bindparam("terms", expanding=True)
    )
    found = {str(term): int(doc) for term, doc in (await session.execute(statement, {"terms": candidates})).all()}
    return {word: max((found.get(stem, 0) for stem in _stems(word)), default=0) for word in words}


def within_budget(words: Sequence[str], counts: dict[str, int], budget: int) -> list[str]:
    """The words to match: all if their counts fit the budget, else the rarest that do (at least one)."""
    if sum(counts.get(word, 0) for word in words) <= budget:
        return list(words)
    chosen: list[str] = []
    total = 0
    for word in sorted(words, key=lambda word: counts.get(word, 0)):
        if chosen and total + counts.get(word, 0) > budget:
            break
        chosen.append(word)
        total += counts.get(word, 0)
    return [word for word in words if word in chosen]


def match_expression(words: Sequence[str], selecting: Sequence[str]) -> str:
    """The FTS5 query: chunks with a selecting word, scored on all words."""
    rare = " OR ".join(f'"{word}"' for word in selecting)
    common = [word for word in words if word not in selecting]
    if not common:
        return rare
    others = " OR ".join(f'"{word}"' for word in common)
    return f"({rare}) AND ({others} OR {rare})"


async def search(
    session: AsyncSession, where: str, params: dict[str, object], words: Sequence[str], limit: int
) -> list[tuple[int, str, str, str, float]]:
    """(chunk id, store id, file id, text, score) of the best ``limit`` chunks;
    ``where`` restricts chunks aliased ``c``."""
    matched = within_budget(words, await document_counts(session, words), POSTING_BUDGET)
    # Ranked on ids alone, then the text of the page's rows only (sorting
    # rows with their text made SQLite carry every match's text).
    sql = (
        "SELECT c.id, c.vector_store_id, c.file_id, c.text, ranked.score FROM ("  # noqa: S608 (constant fragments only; values are bound)
        "SELECT c.id, -bm25(vector_store_chunks_fts) AS score FROM vector_store_chunks_fts "
        "JOIN vector_store_chunks c ON c.id = vector_store_chunks_fts.rowid "
        f"WHERE vector_store_chunks_fts MATCH :query AND {where} ORDER BY bm25(vector_store_chunks_fts) LIMIT :limit"
        ") ranked JOIN vector_store_chunks c ON c.id = ranked.id ORDER BY ranked.score DESC, c.id"
    )
    bound = {**params, "query": match_expression(words, matched), "limit": limit}
    statement = text(sql).bindparams(bindparam("stores", expanding=True))
    rows = (await session.execute(statement, bound)).all()
    return [(int(r.id), str(r.vector_store_id), str(r.file_id), str(r.text), float(r.score)) for r in rows]
