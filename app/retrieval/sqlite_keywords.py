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

Which word is rare is judged on the index's own terms: each query word is
run through the same tokenizer (a scratch FTS5 table in the connection's temp
schema, so the stem is exactly the indexed one: "using" and "use" are "us",
"may" is "mai"), and its stem's document count read from an fts5vocab table.
Guessing stems by prefix counted such words as absent, hence rarest, and let
them select 90% of a 100k store (up to 1.5 s per query). Stems are kept per
process (they never change) and counts for ``COUNT_TTL_SECONDS`` (reading a
common stem's count walks its whole posting list: ~10 ms per query at 100k);
a count only steers the candidate budget, never a score.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import TypeVar

from sqlalchemy import bindparam, text
from sqlalchemy.ext.asyncio import AsyncSession

# Rows bm25() may be asked to score per query (about 10-20 ms of FTS5 work at
# 100k chunks; 8,000 lost a fifth of the development MRR there).
POSTING_BUDGET = 16_000
COUNT_TTL_SECONDS = 60.0
_CACHED_TERMS = 50_000

_VOCAB = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.vector_store_chunks_vocab "
    "USING fts5vocab(main, vector_store_chunks_fts, row)"
)
# The chunks' tokenizer (see migration 0004), applied to query words.
_SCRATCH = "CREATE VIRTUAL TABLE IF NOT EXISTS temp.query_words USING fts5(word, tokenize='porter unicode61')"
_SCRATCH_VOCAB = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.query_words_vocab USING fts5vocab(temp, query_words, instance)"
)


Value = TypeVar("Value")


class _Bounded(OrderedDict[str, Value]):
    """A dict that forgets its least recently stored entries beyond ``_CACHED_TERMS``."""

    def remember(self, key: str, value: Value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > _CACHED_TERMS:
            self.popitem(last=False)


_stems: _Bounded[tuple[str, ...]] = _Bounded()  # word -> its index terms
_counts: dict[str, _Bounded[tuple[float, int]]] = {}  # database -> term -> (read at, document count)
_totals: dict[str, tuple[float, int]] = {}  # database -> (read at, chunk rows)


async def index_terms(session: AsyncSession, words: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Each word's terms as the index stores them (usually one stem; none
    for a word the tokenizer drops, several for one it splits)."""
    missing = [word for word in dict.fromkeys(words) if word not in _stems]
    if missing:
        await session.execute(text(_SCRATCH))
        await session.execute(text(_SCRATCH_VOCAB))
        await session.execute(text("DELETE FROM temp.query_words"))
        await session.execute(
            text("INSERT INTO temp.query_words (rowid, word) VALUES (:row, :word)"),
            [{"row": row, "word": word} for row, word in enumerate(missing)],
        )
        found: dict[int, list[str]] = {}
        rows = await session.execute(text("SELECT doc, term FROM temp.query_words_vocab ORDER BY doc, offset"))
        for row, term in rows.all():
            found.setdefault(int(row), []).append(str(term))
        await session.execute(text("DELETE FROM temp.query_words"))
        for row, word in enumerate(missing):
            _stems.remember(word, tuple(found.get(row, ())))
    return {word: _stems[word] for word in words}


async def document_counts(session: AsyncSession, words: Sequence[str]) -> dict[str, int]:
    """Chunks (of every store) holding each word: of its terms, the rarest's count."""
    terms = await index_terms(session, words)
    database = str(session.get_bind().engine.url)
    cache = _counts.setdefault(database, _Bounded())
    now = time.monotonic()
    wanted = sorted({term for word in words for term in terms[word]})
    fresh: dict[str, int] = {}
    stale = []
    for term in wanted:
        entry = cache.get(term)
        if entry is not None and now - entry[0] < COUNT_TTL_SECONDS:
            fresh[term] = entry[1]
        else:
            stale.append(term)
    if stale:
        await session.execute(text(_VOCAB))
        statement = text("SELECT term, doc FROM temp.vector_store_chunks_vocab WHERE term IN :terms").bindparams(
            bindparam("terms", expanding=True)
        )
        read = {str(term): int(doc) for term, doc in (await session.execute(statement, {"terms": stale})).all()}
        for term in stale:
            fresh[term] = read.get(term, 0)
            cache.remember(term, (now, fresh[term]))
    return {word: min((fresh[term] for term in terms[word]), default=0) for word in words}


async def chunk_total(session: AsyncSession) -> int:
    """Rows of the FTS index (bm25()'s N), read at most once per ``COUNT_TTL_SECONDS``."""
    database = str(session.get_bind().engine.url)
    cached = _totals.get(database)
    now = time.monotonic()
    if cached is not None and now - cached[0] < COUNT_TTL_SECONDS:
        return cached[1]
    total = int((await session.execute(text("SELECT count(*) FROM vector_store_chunks"))).scalar_one())
    _totals[database] = (now, total)
    return total


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
    counts = await document_counts(session, words)
    matched = within_budget(words, counts, POSTING_BUDGET)
    # bm25() gives a word in half the rows or more an IDF of 1e-6 but still
    # walks its whole posting list to find that out (per query), so such a
    # word is left out where it only scores ("use", "function", "object" in
    # the Python docs); as a selecting word it stays, so the matches are the
    # same.
    total = await chunk_total(session)
    scoring = [word for word in words if word in matched or 2 * counts[word] < total]
    # Ranked on ids alone, then the text of the page's rows only (sorting
    # rows with their text made SQLite carry every match's text).
    sql = (
        "SELECT c.id, c.vector_store_id, c.file_id, c.text, ranked.score FROM ("  # noqa: S608 (constant fragments only; values are bound)
        "SELECT c.id, -bm25(vector_store_chunks_fts) AS score FROM vector_store_chunks_fts "
        # The store check through the narrow covering index (migration
        # 0011), which the planner would pass over for the wide table's rowid.
        "JOIN vector_store_chunks c INDEXED BY ix_vector_store_chunks_id_store_file "
        "ON c.id = vector_store_chunks_fts.rowid "
        f"WHERE vector_store_chunks_fts MATCH :query AND {where} ORDER BY bm25(vector_store_chunks_fts) LIMIT :limit"
        ") ranked JOIN vector_store_chunks c ON c.id = ranked.id ORDER BY ranked.score DESC, c.id"
    )
    bound = {**params, "query": match_expression(scoring, matched), "limit": limit}
    statement = text(sql).bindparams(bindparam("stores", expanding=True))
    rows = (await session.execute(statement, bound)).all()
    return [(int(r.id), str(r.vector_store_id), str(r.file_id), str(r.text), float(r.score)) for r in rows]
