"""Keyword search on SQLite: FTS5's tokenizer, BM25 from the postings table.

Ranking is app.retrieval.keyword_postings (an impact-ordered inverted table
read top-down per query word). FTS5 is kept for what it does well: turning
text into index terms. Both chunks (at ingest) and query words go through
the same ``porter unicode61`` tokenizer in a scratch FTS5 table of the
connection's temp schema, so a query word's stem is exactly the indexed one
("using" and "use" are "us", "may" is "mai").

At ingest a file's chunks are copied into the scratch table, and fts5vocab's
``instance`` view of it gives each (chunk, term)'s frequency and each
chunk's length (one pass: the length is a window sum of the frequencies):
the postings are written by one INSERT ... SELECT in the table's key order,
nothing crosses into Python. The scratch table is contentless and emptied
with 'delete-all' in the same transaction (a plain DELETE re-tokenized
every row: 3.7 of 66 s loading 20k chunks). Together ~15% off that load.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.retrieval import keyword_postings
from app.retrieval.passing_files import PassingFiles

# Tokens per chunk of the default static chunking (800 tokens, 400 overlap)
# as FTS5 counts them: BM25's average length, fixed so that a stored impact
# never depends on the rest of the store (measured over python3.11-doc).
AVERAGE_LENGTH = 540.0
_CACHED_WORDS = 50_000

_SCRATCH = "CREATE VIRTUAL TABLE IF NOT EXISTS temp.query_words USING fts5(word, tokenize='porter unicode61')"
_SCRATCH_VOCAB = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.query_words_vocab USING fts5vocab(temp, query_words, instance)"
)
_CHUNK_WORDS = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.file_words USING fts5(text, content='', tokenize='porter unicode61')"
)
_CHUNK_WORDS_VOCAB = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS temp.file_words_vocab USING fts5vocab(temp, file_words, instance)"
)
# Inserted in the table's key order (each page of the lists visited once
# per file; no measurable gain at 20k chunks, kept as the natural order).
_WRITE_POSTINGS = (
    f"INSERT INTO {keyword_postings.TABLE} (term, store_key, impact, chunk_id, file_seq) "  # noqa: S608 (constant fragments only; values are bound)
    f"SELECT w.term, :key, {keyword_postings.impact_sql('w.tf', 'w.dl', AVERAGE_LENGTH)} AS impact, w.doc, "
    f"{keyword_postings.FILE_SEQ_SQL} FROM "
    "(SELECT doc, term, tf, sum(tf) OVER (PARTITION BY doc) AS dl FROM "
    "(SELECT doc, term, count(*) AS tf FROM temp.file_words_vocab GROUP BY doc, term)) w "
    "ORDER BY w.term, impact DESC, w.doc"
)


class _Bounded(OrderedDict[str, tuple[str, ...]]):
    """A dict that forgets its least recently stored entries beyond ``_CACHED_WORDS``."""

    def remember(self, key: str, value: tuple[str, ...]) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > _CACHED_WORDS:
            self.popitem(last=False)


_stems = _Bounded()  # word -> its index terms (they never change)


async def index_terms(session: AsyncSession, words: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Each word's terms as the index stores them (usually one stem; none
    for a word the tokenizer drops, several for one it splits)."""
    known = {word: _stems[word] for word in dict.fromkeys(words) if word in _stems}
    missing = [word for word in dict.fromkeys(words) if word not in known]
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
            known[word] = tuple(found.get(row, ()))
            _stems.remember(word, known[word])
    # From ``known``, not the cache: remembering this query's new words may
    # have evicted its older ones.
    return {word: known[word] for word in words}


async def write_postings(session: AsyncSession, vector_store_id: str, file_id: str) -> None:
    """Postings of the file's chunks (just inserted: ingestion replaces a file's chunks whole)."""
    await session.execute(text(_CHUNK_WORDS))
    await session.execute(text(_CHUNK_WORDS_VOCAB))
    await session.execute(text("INSERT INTO temp.file_words (file_words) VALUES ('delete-all')"))
    await session.execute(
        text(
            "INSERT INTO temp.file_words (rowid, text) SELECT id, text FROM main.vector_store_chunks "
            "WHERE vector_store_id = :store AND file_id = :file"
        ),
        {"store": vector_store_id, "file": file_id},
    )
    await session.execute(
        text(_WRITE_POSTINGS),
        {"key": keyword_postings.store_key(vector_store_id), "store": vector_store_id, "file": file_id},
    )
    await session.execute(text("INSERT INTO temp.file_words (file_words) VALUES ('delete-all')"))


async def search(
    session: AsyncSession,
    store_ids: Sequence[str],
    passing: Mapping[str, PassingFiles] | None,
    words: Sequence[str],
    limit: int,
) -> list[tuple[int, str, str, str, float]]:
    """(chunk id, store id, file id, text, score) of the best ``limit`` chunks;
    with ``passing`` (a filtered search: per store, its passing files,
    index.Scope.passing) only chunks of those files."""
    stems = await index_terms(session, words)
    terms = [term for word in words for term in stems[word]]
    ranked = await keyword_postings.top_chunks(session, store_ids, terms, limit, passing=passing)
    return await keyword_postings.with_texts(session, store_ids, ranked)
