"""Retrieval benchmarks: ingestion throughput, search latency, retrieval quality.

Runs in process against the real services and worker code (no HTTP): the
Runtime is built as the server builds it, on SQLite and on an embedded
PostgreSQL (the test suite's, with pgvector).

* ingest: the 317 library pages of Debian's ``python3.11-doc`` (28 MB of
  HTML) are put in a vector store and ingested by the worker's Ingestion
  (parse, chunk at the default static 800/400, index; optionally embed);
  wall time and the process's memory (RSS / peak).
* quality: the hand-written paraphrased questions of
  ``retrieval_questions.json``, each with the library page that answers it;
  a search returns chunks, ranked files are the chunks' files in order (first
  occurrence); recall@1/5 and MRR@10 on the held-out and the development
  split, per mode (``keyword``, or an ``embedding_model`` for hybrid), with a
  plain BM25 over the same chunks as a reference.
* latency: a store of about N chunks (the corpus's pages repeated as files
  of their own) per engine; p50/p95 of one search through the search
  service, without and with an attribute filter.

    apt-get install -y python3.11-doc
    .venv/bin/python bench/retrieval.py                     # everything, both engines
    .venv/bin/python bench/retrieval.py --engines sqlite --only corpus --modes keyword
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import select, text  # noqa: E402

from app import ids, orm  # noqa: E402
from app.retrieval import chunking, embed, index, ingest, keyword_postings, parse  # noqa: E402
from app.retrieval import search as ranking  # noqa: E402
from app.runtime import Runtime  # noqa: E402
from app.services import projects, vector_store_files, vector_store_search, vector_stores  # noqa: E402
from app.settings import Settings  # noqa: E402
from app.wire.vector_stores import SearchRequest  # noqa: E402

CORPUS = Path("/usr/share/doc/python3.11/html/library")

QUESTIONS_FILE = Path(__file__).with_name("retrieval_questions.json")


def load_questions() -> list[dict[str, str]]:
    """Paraphrased questions, each naming its target page and its split (dev / heldout); see the file's note."""
    return list(json.loads(QUESTIONS_FILE.read_text(encoding="utf-8"))["questions"])


QUESTIONS = load_questions()


def memory_mib() -> tuple[float, float]:
    """This process's resident memory now and its peak so far (MiB): the
    bench runs the server's code in process, so this is the server's memory."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def embedding_of(mode: str) -> str | None:
    """The routing file's embedding_model for a mode: ``default`` writes no
    file (what a user gets: minilm-static when its model is installed),
    ``keyword`` turns embeddings off."""
    return {"default": None, "keyword": "none"}.get(mode, mode)


async def start_runtime(url: str, data_dir: Path, embedding: str | None) -> Runtime:
    config = None
    if embedding:
        config = data_dir / "models.yaml"
        await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(config.write_text, f"embedding_model: {embedding}\n")
    return await Runtime.start(Settings(data_dir=data_dir, database_url=url, llm_config=config))


async def add_files(runtime: Runtime, paths: Sequence[Path]) -> str:
    """A store holding these files, queued for ingestion."""
    async with runtime.transaction() as session:
        store = vector_stores.new_store(projects.DEFAULT, name="bench")
        session.add(store)
        files = []
        for path in paths:
            seq = ids.next_seq()
            row = orm.File(
                id=ids.new_id(ids.FILE, seq),
                project_id=orm.DEFAULT_PROJECT_ID,
                seq=seq,
                created_at=ids.seconds(seq),
                bytes=path.stat().st_size,
                filename=path.name,
                purpose="assistants",
                status="processed",
            )
            shutil.copyfile(path, runtime.storage.path(row.id))
            session.add(row)
            files.append(row)
        await session.flush()
        await vector_store_files.attach(session, store, [(row, chunking.static(), None) for row in files])
        return store.id


async def ingest_all(runtime: Runtime) -> float:
    """Seconds until the worker's Ingestion has no file left in progress."""
    done = asyncio.Event()
    worker = ingest.Ingestion(runtime, "bench", wake=done.set)
    started = time.perf_counter()
    while True:
        await worker.tick()
        if not worker.tasks:
            break
        done.clear()
        await asyncio.wait([asyncio.ensure_future(done.wait())], timeout=1.0)
    return time.perf_counter() - started


async def rank_files(runtime: Runtime, store_id: str, names: dict[str, str], question: str) -> tuple[list[str], float]:
    """Files of the result chunks in rank order (first occurrence) and the search's seconds."""
    started = time.perf_counter()
    vectors = await embed.embed_queries(runtime.settings, [question])
    async with runtime.reading() as session:
        hits = await ranking.search(session, [store_id], [question], 50, query_vectors=vectors)
    elapsed = time.perf_counter() - started
    ranked: list[str] = []
    for hit in hits:
        if names[hit.file_id] not in ranked:
            ranked.append(names[hit.file_id])
    return ranked, elapsed


def quality(rankings: list[list[str]], split: str) -> dict[str, float]:
    """recall@1, recall@5 and MRR@10 over the questions of one split."""
    chosen = [(ranked, q) for ranked, q in zip(rankings, QUESTIONS, strict=True) if q["split"] == split]
    r1 = r5 = mrr = 0.0
    for ranked, q in chosen:
        target = f"{q['page']}.html"
        r1 += target in ranked[:1]
        r5 += target in ranked[:5]
        if target in ranked[:10]:
            mrr += 1 / (ranked.index(target) + 1)
    n = len(chosen) or 1
    return {"r1": r1 / n, "r5": r5 / n, "mrr": mrr / n}


_BM25_WORD = re.compile(r"\w+")


def bm25_reference(chunks: list[tuple[str, str]], k1: float = 1.2, b: float = 0.75) -> list[list[str]]:
    """Plain Okapi BM25 (lower-cased words, no stemming or stopwords) over the
    same chunks, as a reference: files ranked by their best chunk."""
    docs = [Counter(_BM25_WORD.findall(text.lower())) for _, text in chunks]
    lengths = [sum(doc.values()) for doc in docs]
    average = sum(lengths) / len(lengths)
    df: Counter[str] = Counter()
    for doc in docs:
        df.update(doc.keys())
    postings: dict[str, list[int]] = {}
    for i, doc in enumerate(docs):
        for word in doc:
            postings.setdefault(word, []).append(i)
    rankings = []
    for q in QUESTIONS:
        scores: dict[int, float] = {}
        for word in set(_BM25_WORD.findall(q["question"].lower())):
            idf = math.log(1 + (len(docs) - df[word] + 0.5) / (df[word] + 0.5))
            for i in postings.get(word, []):
                tf = docs[i][word]
                scores[i] = scores.get(i, 0.0) + idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths[i] / average))
        ranked: list[str] = []
        for i in sorted(scores, key=lambda i: -scores[i]):
            if chunks[i][0] not in ranked:
                ranked.append(chunks[i][0])
            if len(ranked) == 10:
                break
        rankings.append(ranked)
    return rankings


async def corpus_run(url: str, work: Path, embedding: str | None) -> dict[str, Any]:
    runtime = await start_runtime(url, work, embedding)
    try:
        paths = sorted(await asyncio.to_thread(lambda: list(CORPUS.glob("*.html"))))
        store_id = await add_files(runtime, paths)
        cpu_started = time.process_time()
        seconds = await ingest_all(runtime)
        ingest_cpu = time.process_time() - cpu_started  # this process's threads: parsing, embedding, SQLite
        if runtime.engine.dialect.name == "postgresql":
            async with runtime.transaction() as session:  # as autovacuum would after the load
                await session.execute(text("ANALYZE vector_store_chunks"))
        async with runtime.transaction() as session:
            counts = await vector_stores.to_wire(session, await vector_stores.get(session, projects.DEFAULT, store_id))
            rows = await session.scalars(
                select(orm.VectorStoreFile).where(orm.VectorStoreFile.vector_store_id == store_id)
            )
            names = {row.file_id: row.filename for row in rows}
        results = [await rank_files(runtime, store_id, names, q["question"]) for q in QUESTIONS]
        rankings = [ranked for ranked, _ in results]
        chunks = await stored_chunks(runtime, store_id, names)
        return {
            "pages": len(paths),
            "megabytes": sum(p.stat().st_size for p in paths) / 1e6,
            "chunks": len(chunks),
            "seconds": seconds,
            "ingest_cpu": ingest_cpu,
            "completed": counts.file_counts.completed,
            "failed": counts.file_counts.failed,
            "dev": quality(rankings, "dev"),
            "heldout": quality(rankings, "heldout"),
            "bm25_dev": quality(bm25_reference(chunks), "dev"),
            "bm25_heldout": quality(bm25_reference(chunks), "heldout"),
            "rss": memory_mib(),
            "p50": percentile([t for _, t in results], 0.5) * 1000,
            "p95": percentile([t for _, t in results], 0.95) * 1000,
        }
    finally:
        await runtime.close()


async def stored_chunks(runtime: Runtime, store_id: str, names: dict[str, str]) -> list[tuple[str, str]]:
    async with runtime.transaction() as session:
        rows = await session.execute(
            select(orm.VectorStoreChunk.file_id, orm.VectorStoreChunk.text).where(
                orm.VectorStoreChunk.vector_store_id == store_id
            )
        )
        return [(names[file_id], text) for file_id, text in rows.all()]


def corpus_chunks() -> list[tuple[str, list[str]]]:
    """(page, its chunks at the default 800/400) for every page of the corpus."""
    pages = []
    for path in sorted(CORPUS.glob("*.html")):
        pages.append((path.name, chunking.chunk(parse.extract_text(path, path.name))))
    return pages


@dataclass
class LoadedStore:
    """A latency store already in a database: later modes search it again
    instead of loading 100k chunks once per mode."""

    store_id: str
    chunks: int
    copies: int
    load_s: float


async def load_latency_store(
    runtime: Runtime, pages: list[tuple[str, list[str]]], size: int, with_vectors: bool
) -> LoadedStore:
    """A store of about ``size`` chunks (the corpus's pages repeated as files
    of their own, as if uploaded again and again); vectors when asked."""
    model = embed.embedder(runtime.settings) if with_vectors else None
    async with runtime.transaction() as session:
        store = vector_stores.new_store(projects.DEFAULT, name=f"latency {size}")
        session.add(store)
    # Embedded once per distinct chunk; copies reuse the vectors.
    vectors: dict[str, list[list[float]] | None] = {}
    for name, pieces in pages:
        head = ingest.document_head(pieces[0], name)
        vectors[name] = await embed.embed_document(model, pieces, head) if model is not None else None
    loaded = time.perf_counter()
    count = copy = 0
    while count < size:
        async with runtime.transaction() as session:
            for name, pieces in pages:
                seq = ids.next_seq()
                file_id = ids.new_id(ids.FILE, seq)
                session.add(
                    orm.VectorStoreFile(
                        vector_store_id=store.id,
                        file_id=file_id,
                        seq=seq,
                        created_at=ids.seconds(seq),
                        filename=name,
                        status="completed",
                        usage_bytes=0,
                        chunking_strategy=chunking.static(),
                        attributes={"copy": copy},
                    )
                )
                await index.add_chunks(session, store.id, file_id, pieces, vectors[name])
                count += len(pieces)
        copy += 1
    if runtime.engine.dialect.name == "postgresql":
        # What autovacuum does shortly after a bulk load: planner statistics,
        # and the visibility map that lets the postings be read from their index alone.
        async with runtime.engine.connect() as connection:
            autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
            await autocommit.execute(text("VACUUM ANALYZE"))
    return LoadedStore(store.id, count, copy, time.perf_counter() - loaded)


def postgres_cpu_s(pg: Any) -> float:
    """CPU seconds of the embedded PostgreSQL's processes (its backends are
    the postmaster's children): the database's side of a search."""
    if pg is None:
        return 0.0
    postmaster = int((pg.root / "data" / "postmaster.pid").read_text().split()[0])
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster or stat.parent.name == str(postmaster):
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def keyword_overlap(runtime: Runtime, store_id: str, questions: Sequence[str]) -> float:
    """Mean share of the exact BM25 top 10 (the postings read to the end: no
    depth bound) that the keyword top 10 also holds, compared by text: the
    store repeats each chunk as copies of equal score, and which copies win
    a tie is arbitrary."""
    shares = []
    for question in questions:
        async with runtime.transaction() as session:
            bounded = await index.keyword_search(session, index.Scope([store_id]), question, 10)
            depth, keyword_postings.DEPTH = keyword_postings.DEPTH, 10**9
            try:
                exact = await index.keyword_search(session, index.Scope([store_id]), question, 10)
            finally:
                keyword_postings.DEPTH = depth
        if exact:
            common = Counter(hit.text for hit in bounded) & Counter(hit.text for hit in exact)
            shares.append(sum(common.values()) / len(exact))
    return sum(shares) / max(1, len(shares))


async def latency_run(
    url: str,
    work: Path,
    pages: list[tuple[str, list[str]]],
    size: int,
    embedding: str | None,
    loaded: LoadedStore | None,
    pg: Any,
) -> dict[str, Any]:
    """Searches through the same service as POST /vector_stores/{id}/search
    on a store of about ``size`` chunks (loaded here unless given)."""
    runtime = await start_runtime(url, work, embedding)
    try:
        if loaded is None:
            loaded = await load_latency_store(runtime, pages, size, embedding not in embed.KEYWORD_ONLY)
        questions = [q["question"] for q in QUESTIONS[:60]]
        timings: dict[str, list[float]] = {"plain": [], "filtered": []}
        # The server's own CPU per search (this process) and PostgreSQL's
        # (its backends): less sensitive than wall time to a loaded machine.
        cpu: dict[str, list[float]] = {"plain": [], "filtered": []}
        database_cpu: dict[str, float] = {}
        for kind in timings:
            body: dict[str, Any] = {"query": "", "max_num_results": 10}
            if kind == "filtered":  # about a third of the files pass
                body["filters"] = {"type": "lt", "key": "copy", "value": max(1, loaded.copies // 3)}
            for rep in range(2):
                if rep == 1:
                    pg_started = postgres_cpu_s(pg)
                for question in questions:
                    started, cpu_started = time.perf_counter(), time.process_time()
                    # As the endpoint does: an in-process embedder runs beside the keyword
                    # query, in a read-only transaction; the store's use written once a second.
                    query_vectors = await embed.start_query_embedding(runtime.settings, [question])
                    async with runtime.reading() as session:
                        request = SearchRequest.model_validate({**body, "query": question})
                        found = await vector_store_search.search(
                            session, projects.DEFAULT, loaded.store_id, request, query_vectors
                        )
                    if vector_stores.stale_activity(found.store):
                        async with runtime.transaction() as session:
                            await vector_stores.touch_ids(session, [found.store.id])
                    timings[kind].append((time.perf_counter() - started) * 1000)
                    cpu[kind].append((time.process_time() - cpu_started) * 1000)
            database_cpu[kind] = (postgres_cpu_s(pg) - pg_started) * 1000 / len(questions)
        result: dict[str, Any] = {"load_s": loaded.load_s, "chunks": loaded.chunks, "rss": memory_mib()}
        result["loaded"] = loaded
        for kind, values in timings.items():
            warm = values[len(questions) :]  # the second pass: caches warm, as in a running server
            result[kind] = (percentile(warm, 0.5), percentile(warm, 0.95), max(values))
            result[f"{kind}_cpu"] = percentile(cpu[kind][len(questions) :], 0.5)
            result[f"{kind}_db_cpu"] = database_cpu[kind]
        if embedding in embed.KEYWORD_ONLY:
            result["overlap"] = await keyword_overlap(runtime, loaded.store_id, questions)
        return result
    finally:
        await runtime.close()


def engine_url(engine: str, work: Path, pg: Any, name: str) -> str:
    if engine == "sqlite":
        return f"sqlite+aiosqlite:///{work / (name + '.db')}"
    pg.create_database(name)
    return str(pg.url(name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="sqlite,postgres")
    parser.add_argument("--only", choices=["corpus", "latency"], default=None)
    parser.add_argument("--sizes", default="3000,100000")
    parser.add_argument(
        "--modes",
        default="default,keyword",
        help="default (no configuration), keyword (embedding_model: none) and/or embedding models "
        "for hybrid runs (minilm-static, hashing, all-minilm-l6-v2)",
    )
    args = parser.parse_args()
    modes = args.modes.split(",")
    engines = args.engines.split(",")
    if not CORPUS.is_dir():
        sys.exit(f"{CORPUS} is missing: apt-get install -y python3.11-doc")
    work = Path(tempfile.mkdtemp(prefix="bench-retrieval-"))
    pg = None
    if "postgres" in engines:
        from tests.pg import EmbeddedPostgres

        pg = EmbeddedPostgres.start()
    try:
        if args.only in (None, "corpus"):
            print(
                "| engine | mode | chunks | ingest s | ingest CPU s | failed | held-out MRR@10 | R@1 | R@5 "
                "| dev MRR@10 | R@5 | search p50 ms | p95 ms | RSS / peak MiB | load average |"
            )
            print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            for engine in engines:
                for mode in modes:
                    name = f"corpus_{engine}_{mode}"
                    url = engine_url(engine, work, pg, name)
                    r = asyncio.run(corpus_run(url, work / name, embedding_of(mode)))
                    h, d = r["heldout"], r["dev"]
                    print(
                        f"| {engine} | {mode} | {r['chunks']} | {r['seconds']:.1f} | {r['ingest_cpu']:.1f} | "
                        f"{r['failed']} | {h['mrr']:.3f} | {h['r1']:.3f} | {h['r5']:.3f} | {d['mrr']:.3f} | "
                        f"{d['r5']:.3f} | {r['p50']:.1f} | {r['p95']:.1f} | {r['rss'][0]:.0f} / {r['rss'][1]:.0f} | "
                        f"{os.getloadavg()[0]:.1f} |",
                        flush=True,
                    )
                    h, d = r["bm25_heldout"], r["bm25_dev"]
                    print(
                        f"| (reference) | plain BM25 over the same chunks | | | | | {h['mrr']:.3f} | {h['r1']:.3f} | "
                        f"{h['r5']:.3f} | {d['mrr']:.3f} | {d['r5']:.3f} | | | | |",
                        flush=True,
                    )
        if args.only in (None, "latency"):
            pages = corpus_chunks()
            print(f"\n{sum(len(p) for _, p in pages)} distinct chunks in {len(pages)} pages\n")
            print(
                "| engine | chunks | mode | load s | p50 ms | p95 ms | filtered p50 ms | p95 ms | slowest cold ms "
                "| RSS / peak MiB | CPU p50 ms (plain / filtered) | PostgreSQL CPU ms per search (plain / filtered) "
                "| keyword top-10 overlap with exact BM25 | load average |"
            )
            print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            for engine in engines:
                for size in (int(s) for s in args.sizes.split(",")):
                    # One store per engine and size, loaded by the first mode
                    # (with vectors if any mode searches them) and searched by all.
                    name = f"latency_{engine}_{size}"
                    url = engine_url(engine, work, pg, name)
                    loaded = None
                    ordered = sorted(modes, key=lambda mode: embedding_of(mode) in embed.KEYWORD_ONLY)
                    for mode in ordered:
                        r = asyncio.run(
                            latency_run(url, work / f"{name}_{mode}", pages, size, embedding_of(mode), loaded, pg)
                        )
                        loaded = r["loaded"]
                        plain, filtered = r["plain"], r["filtered"]
                        print(
                            f"| {engine} | {r['chunks']} | {mode} | {r['load_s']:.1f} | {plain[0]:.1f} | "
                            f"{plain[1]:.1f} | {filtered[0]:.1f} | {filtered[1]:.1f} | "
                            f"{max(plain[2], filtered[2]):.1f} | {r['rss'][0]:.0f} / {r['rss'][1]:.0f} | "
                            f"{r['plain_cpu']:.1f} / {r['filtered_cpu']:.1f} | "
                            f"{r['plain_db_cpu']:.1f} / {r['filtered_db_cpu']:.1f} | "
                            f"{r.get('overlap', float('nan')):.3f} | {os.getloadavg()[0]:.1f} |",
                            flush=True,
                        )
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
