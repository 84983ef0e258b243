"""Retrieval benchmarks: ingestion throughput, search latency, retrieval quality.

Runs in process against the real services and worker code (no HTTP): the
Runtime is built as the server builds it, on SQLite and on an embedded
PostgreSQL (the test suite's, with pgvector).

* ingest: the 317 library pages of Debian's ``python3.11-doc`` (28 MB of
  HTML) are put in a vector store and ingested by the worker's Ingestion
  (parse, chunk at the default static 800/400, index; optionally embed);
  pages and MB per second, wall time.
* quality: a labelled set of paraphrased questions (below), each with the
  library page that answers it; a search returns chunks, ranked files are the
  chunks' files in order (first occurrence); recall@5 and MRR@10 per mode:
  keyword only (BM25 / ts_rank) and hybrid (keyword + the hashing embedder,
  reciprocal rank fusion).
* latency: a store of N chunks (windows of the corpus text, repeated to
  reach N) per engine; p50/p95 of one search over the labelled questions.

    apt-get install -y python3.11-doc
    .venv/bin/python bench/retrieval.py                     # everything, both engines
    .venv/bin/python bench/retrieval.py --engines sqlite --only quality
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import select  # noqa: E402

from app import ids, orm  # noqa: E402
from app.retrieval import chunking, embed, index, ingest, parse  # noqa: E402
from app.retrieval import search as ranking  # noqa: E402
from app.runtime import Runtime  # noqa: E402
from app.services import vector_store_files, vector_stores  # noqa: E402
from app.settings import Settings  # noqa: E402

CORPUS = Path("/usr/share/doc/python3.11/html/library")

# (question, the page that answers it). Written for this benchmark; questions
# paraphrase the task rather than name the module where that reads naturally.
QUESTIONS: list[tuple[str, str]] = [
    ("How do I read command line options and flags with generated help messages?", "argparse"),
    ("run an external program and capture what it prints", "subprocess"),
    ("serialize Python objects to a byte stream and restore them later", "pickle"),
    ("compute a SHA-256 digest of some data", "hashlib"),
    ("generate cryptographically strong random tokens for passwords", "secrets"),
    ("match text against a regular expression pattern", "re"),
    ("schedule coroutines concurrently and wait for all of them", "asyncio-task"),
    ("a double-ended queue with fast appends and pops on both sides", "collections"),
    ("decorator that caches the results of a function call", "functools"),
    ("iterate over all combinations and permutations of items", "itertools"),
    ("parse and format dates and times with UTC offsets", "datetime"),
    ("IANA time zone database support", "zoneinfo"),
    ("exact decimal floating point arithmetic for money", "decimal"),
    ("rational numbers with a numerator and denominator", "fractions"),
    ("mean, median and standard deviation of a sample", "statistics"),
    ("read and write comma separated values from spreadsheets", "csv"),
    ("encode and decode JavaScript object notation documents", "json"),
    ("object-oriented filesystem paths", "pathlib"),
    ("copy and move whole directory trees, remove a folder recursively", "shutil"),
    ("find files whose names match a wildcard pattern like *.txt", "glob"),
    ("create temporary files and directories that are cleaned up automatically", "tempfile"),
    ("compress and decompress files in the gzip format", "gzip"),
    ("read and write zip archives", "zipfile"),
    ("create and extract tar archives", "tarfile"),
    ("an embedded SQL database stored in a single file", "sqlite3"),
    ("send email through an SMTP server", "smtplib"),
    ("open a URL and fetch the page over HTTP", "urllib.request"),
    ("split a URL into scheme, network location, path and query string", "urllib.parse"),
    ("low-level networking interface for TCP connections", "socket"),
    ("wrap network connections with TLS encryption and certificates", "ssl"),
    ("run callables in a pool of worker threads and get futures back", "concurrent.futures"),
    ("spawn processes to use several CPU cores, sharing data through queues", "multiprocessing"),
    ("locks, events and condition variables for threads", "threading"),
    ("emit log messages with levels, handlers and formatters", "logging"),
    ("write test cases with assertions and run them", "unittest"),
    ("replace parts of the system under test with fake objects and check how they were called", "unittest.mock"),
    ("measure the execution time of small code snippets", "timeit"),
    ("step through code with breakpoints in an interactive debugger", "pdb"),
    ("trace memory allocations to find leaks", "tracemalloc"),
    ("type hints, generics and structural protocols", "typing"),
    ("automatically generate __init__ and __repr__ for classes that hold data", "dataclasses"),
    ("symbolic names bound to unique constant values", "enum"),
    ("abstract base classes and abstract methods", "abc"),
    ("utilities for with-statement context managers", "contextlib"),
    ("shallow and deep copies of compound objects", "copy"),
    ("pretty print nested data structures readably", "pprint"),
    ("wrap and fill paragraphs of text to a given width", "textwrap"),
    ("compare sequences and produce differences between texts", "difflib"),
    ("keep a list sorted by inserting with binary search", "bisect"),
    ("priority queue built on a binary heap", "heapq"),
    ("synchronized FIFO queue for producer and consumer threads", "queue"),
    ("parse configuration files with sections and key value pairs", "configparser"),
    ("parse TOML configuration files", "tomllib"),
    ("parse XML documents into an element tree", "xml.etree.elementtree"),
    ("encode binary data as printable ASCII using base 64", "base64"),
    ("pack and unpack binary records laid out like C structs", "struct"),
    ("generate universally unique identifiers", "uuid"),
    ("pseudo-random numbers, shuffling and sampling from a population", "random"),
    ("square roots, trigonometric functions and logarithms", "math"),
    ("manipulate IPv4 and IPv6 addresses and networks", "ipaddress"),
    ("references to objects that do not keep them alive", "weakref"),
    ("get the signature and source code of live objects", "inspect"),
    ("disassemble Python bytecode", "dis"),
    ("abstract syntax trees of Python source code", "ast"),
    ("set handlers for asynchronous events such as SIGINT", "signal"),
    ("create isolated virtual environments with their own site directories", "venv"),
    ("register functions to run when the interpreter exits", "atexit"),
    ("print or format the stack trace of an exception", "traceback"),
    ("interpreter variables such as argv and the module search path", "sys"),
    ("environment variables, process ids and other operating system interfaces", "os"),
]


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


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
        store = vector_stores.new_store(name="bench")
        session.add(store)
        files = []
        for path in paths:
            seq = ids.next_seq()
            row = orm.File(
                id=ids.new_id(ids.FILE, seq),
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
    async with runtime.transaction() as session:
        hits = await ranking.search(session, [store_id], [question], 50, query_vectors=vectors)
    elapsed = time.perf_counter() - started
    ranked: list[str] = []
    for hit in hits:
        if names[hit.file_id] not in ranked:
            ranked.append(names[hit.file_id])
    return ranked, elapsed


def quality(rankings: list[list[str]]) -> tuple[float, float]:
    recall = mrr = 0.0
    for ranked, (_, page) in zip(rankings, QUESTIONS, strict=True):
        target = f"{page}.html"
        if target in ranked[:5]:
            recall += 1
        if target in ranked[:10]:
            mrr += 1 / (ranked.index(target) + 1)
    return recall / len(QUESTIONS), mrr / len(QUESTIONS)


async def corpus_run(url: str, work: Path, embedding: str | None) -> dict[str, Any]:
    runtime = await start_runtime(url, work, embedding)
    try:
        paths = sorted(await asyncio.to_thread(lambda: list(CORPUS.glob("*.html"))))
        store_id = await add_files(runtime, paths)
        seconds = await ingest_all(runtime)
        async with runtime.transaction() as session:
            counts = await vector_stores.to_wire(session, await vector_stores.get(session, store_id))
            rows = await session.scalars(
                select(orm.VectorStoreFile).where(orm.VectorStoreFile.vector_store_id == store_id)
            )
            names = {row.file_id: row.filename for row in rows}
        results = [await rank_files(runtime, store_id, names, question) for question, _ in QUESTIONS]
        recall, mrr = quality([ranked for ranked, _ in results])
        return {
            "pages": len(paths),
            "megabytes": sum(p.stat().st_size for p in paths) / 1e6,
            "seconds": seconds,
            "completed": counts.file_counts.completed,
            "failed": counts.file_counts.failed,
            "recall": recall,
            "mrr": mrr,
            "p50": percentile([t for _, t in results], 0.5) * 1000,
        }
    finally:
        await runtime.close()


def corpus_windows(words_per_chunk: int = 100) -> list[str]:
    windows = []
    for path in sorted(CORPUS.glob("*.html")):
        words = parse.extract_text(path, path.name).split()
        windows.extend(" ".join(words[i : i + words_per_chunk]) for i in range(0, len(words), words_per_chunk))
    return windows


async def latency_run(url: str, work: Path, windows: list[str], size: int, embedding: str | None) -> dict[str, Any]:
    runtime = await start_runtime(url, work, embedding)
    model = embed.embedder(runtime.settings)
    try:
        async with runtime.transaction() as session:
            store = vector_stores.new_store(name=f"latency {size}")
            session.add(store)
        loaded = time.perf_counter()
        for start in range(0, size, 2000):
            pieces = [
                f"{windows[i % len(windows)]} #{i // len(windows)}" for i in range(start, min(size, start + 2000))
            ]
            vectors = await model.embed(pieces) if model is not None else None
            async with runtime.transaction() as session:
                await index.add_chunks(session, store.id, f"file-bench{start // 2000}", pieces, vectors)
        loaded = time.perf_counter() - loaded
        timings = []
        for question, _ in QUESTIONS * 2:
            started = time.perf_counter()
            vectors = await embed.embed_queries(runtime.settings, [question])
            async with runtime.transaction() as session:
                await ranking.search(session, [store.id], [question], 20, query_vectors=vectors)
            timings.append((time.perf_counter() - started) * 1000)
        warm = timings[len(QUESTIONS) :]  # the second pass: caches warm, as in a running server
        return {"load_s": loaded, "p50": percentile(warm, 0.5), "p95": percentile(warm, 0.95), "cold_max": max(timings)}
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
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument(
        "--modes",
        default="keyword,hashing",
        help="keyword and/or embedding models for hybrid runs (hashing, all-minilm-l6-v2)",
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
                "| engine | mode | pages | MB | ingest s | pages/s | MB/s | failed | recall@5 | MRR@10 "
                "| search p50 ms |"
            )
            print("|---|---|---|---|---|---|---|---|---|---|---|")
            for engine in engines:
                for mode in modes:
                    name = f"corpus_{engine}_{mode}"
                    url = engine_url(engine, work, pg, name)
                    r = asyncio.run(corpus_run(url, work / name, None if mode == "keyword" else mode))
                    print(
                        f"| {engine} | {'keyword' if mode == 'keyword' else f'hybrid ({mode})'} | {r['pages']} | "
                        f"{r['megabytes']:.1f} | {r['seconds']:.1f} | {r['pages'] / r['seconds']:.1f} | "
                        f"{r['megabytes'] / r['seconds']:.2f} | {r['failed']} | {r['recall']:.3f} | {r['mrr']:.3f} | "
                        f"{r['p50']:.1f} |",
                        flush=True,
                    )
        if args.only in (None, "latency"):
            windows = corpus_windows()
            print(f"\n{len(windows)} distinct windows of 100 words\n")
            print("| engine | chunks | mode | load s | search p50 ms | p95 ms | slowest cold ms |")
            print("|---|---|---|---|---|---|---|")
            for engine in engines:
                for size in (int(s) for s in args.sizes.split(",")):
                    for mode in modes:
                        name = f"latency_{engine}_{size}_{mode}"
                        url = engine_url(engine, work, pg, name)
                        r = asyncio.run(
                            latency_run(url, work / name, windows, size, None if mode == "keyword" else mode)
                        )
                        print(
                            f"| {engine} | {size} | {'keyword' if mode == 'keyword' else f'hybrid ({mode})'} | "
                            f"{r['load_s']:.1f} | {r['p50']:.1f} | {r['p95']:.1f} | {r['cold_max']:.1f} |",
                            flush=True,
                        )
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
