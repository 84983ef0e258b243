"""What one SQLite write transaction costs in process, layer by layer (issue 17).

The same transaction (one held-back INSERT of a small row, then COMMIT: one
hop to aiosqlite's thread, as a run's create or end is on SQLite) made
``--transactions`` times in a row through each layer, the layers alternated
``--rounds`` times; per transaction: CPU of the event loop's thread and of
the whole process (aiosqlite's thread included), wall time. Asserts nothing.

- ``raw``: aiosqlite's connection, one call to its thread doing BEGIN
  IMMEDIATE, the INSERT and COMMIT (the floor of any driver on aiosqlite).
- ``core``: ``engine.begin()`` and ``execute`` of a prebuilt Core INSERT
  (pool checkout and return, the write lock's ``begin`` event, compile
  cache, execution context, result).
- ``session``: ``sessionmaker()`` and ``session.begin()`` around the same
  execute (what services get).
- ``straight``, ``straight2``: ``session`` and ``session2`` with the INSERTs
  handed to the driver (``db.hold_back``, app/held_back.py) instead.
- ``runtime``: ``Runtime.transaction()`` (the session plus the run log's
  committed()/rolled_back()).

``--profile LAYER`` prints cProfile's top functions for that layer instead;
``--runs N [--clients C]`` measures whole streamed runs through the app
instead (in process, offline model: process CPU per run).

    .venv/bin/python bench/sqlite_transaction.py --transactions 2000 --rounds 2
    .venv/bin/python bench/sqlite_transaction.py --profile session
    .venv/bin/python bench/sqlite_transaction.py --runs 400 --clients 16
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiosqlite
from sqlalchemy import Column, MetaData, Table, Text, event, insert
from sqlalchemy.ext.asyncio import AsyncSession

from app import db, ids
from app.runtime import Runtime
from app.settings import Settings

_METADATA = MetaData()
_ROWS = Table("sqltx_bench", _METADATA, Column("id", Text, primary_key=True), Column("body", Text))
_INSERT = insert(_ROWS).execution_options(**db.WRITE_BEHIND)
_RAW_INSERT = "INSERT INTO sqltx_bench (id, body) VALUES (?, ?)"
_BODY = "x" * 200

Transaction = Callable[[], Awaitable[None]]


def _params() -> dict[str, str]:
    return {"id": ids.new_id("b"), "body": _BODY}


async def _layers(runtime: Runtime, raw: object) -> dict[str, Transaction]:
    engine, sessionmaker = runtime.engine, runtime.sessionmaker

    async def raw_tx() -> None:
        params = _params()

        def on_thread(connection: sqlite3.Connection) -> None:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(_RAW_INSERT, (params["id"], params["body"]))
            connection.commit()

        await raw._execute(on_thread, raw._conn)  # type: ignore[attr-defined]

    async def core_tx() -> None:
        async with engine.begin() as connection:
            await connection.execute(_INSERT, _params())

    async def session_tx() -> None:
        async with sessionmaker() as session, session.begin():
            await session.execute(_INSERT, _params())

    async def session_two_tx() -> None:  # a second held-back INSERT: what one more statement costs
        async with sessionmaker() as session, session.begin():
            await session.execute(_INSERT, _params())
            await session.execute(_INSERT, _params())

    async def session_straight_tx() -> None:  # the INSERT handed to the driver (app/held_back.py)
        async with sessionmaker() as session, session.begin():
            assert await db.hold_back(session, _INSERT, _params(), db.WRITE_BEHIND)

    async def session_two_straight_tx() -> None:
        async with sessionmaker() as session, session.begin():
            assert await db.hold_back(session, _INSERT, _params(), db.WRITE_BEHIND)
            assert await db.hold_back(session, _INSERT, _params(), db.WRITE_BEHIND)

    async def raw_two_tx() -> None:
        first, second = _params(), _params()

        def on_thread(connection: sqlite3.Connection) -> None:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(_RAW_INSERT, (first["id"], first["body"]))
            connection.execute(_RAW_INSERT, (second["id"], second["body"]))
            connection.commit()

        await raw._execute(on_thread, raw._conn)  # type: ignore[attr-defined]

    async def session_plain_close_tx() -> None:  # the session closed without a task and shield around it
        session = sessionmaker()
        try:
            async with session.begin():
                await session.execute(_INSERT, _params())
        finally:
            await session.close()

    async def runtime_tx() -> None:
        async with runtime.transaction() as session:
            await session.execute(_INSERT, _params())

    held = await engine.connect()  # a connection kept out of the pool: no checkout nor return

    async def checkout() -> None:  # the pool's checkout and return (with its reset), nothing else
        async with engine.connect():
            pass

    async def held_text_tx() -> None:  # a held connection, the INSERT as driver SQL: no compile cache
        params = _params()
        async with held.begin():
            await held.exec_driver_sql(_RAW_INSERT, (params["id"], params["body"]))

    async def held_tx() -> None:
        async with held.begin():
            await held.execute(_INSERT, _params())

    async def held_session_tx() -> None:  # a session on the held connection
        async with AsyncSession(bind=held) as session, session.begin():
            await session.execute(_INSERT, _params())

    async def params_only() -> None:  # what the harness itself costs per transaction
        _params()

    return {
        "raw": raw_tx,
        "params": params_only,
        "checkout": checkout,
        "heldtext": held_text_tx,
        "held": held_tx,
        "heldsess": held_session_tx,
        "core": core_tx,
        "session": session_tx,
        "sessclose": session_plain_close_tx,
        "session2": session_two_tx,
        "straight": session_straight_tx,
        "straight2": session_two_straight_tx,
        "raw2": raw_two_tx,
        "runtime": runtime_tx,
    }


async def _measure(transaction: Transaction, count: int) -> tuple[float, float, float]:
    for _ in range(50):  # warm: pool, caches
        await transaction()
    process, thread, wall = time.process_time(), time.thread_time(), time.perf_counter()
    for _ in range(count):
        await transaction()
    scale = 1e6 / count
    return (
        (time.thread_time() - thread) * scale,
        (time.process_time() - process) * scale,
        (time.perf_counter() - wall) * scale,
    )


async def _whole_runs(folder: str, runs: int, clients: int) -> None:
    """``--runs``: streamed ``POST /v1/threads/runs`` (offline model, a new
    thread each) through the whole app in process (httpx's ASGI transport;
    the embedded worker), ``clients`` at a time; CPU of the process per run,
    the client's share included (the same on both sides of a comparison)."""
    import httpx2

    from app.main import create_app

    settings = Settings(data_dir=Path(folder) / "app", poll_after_ms=10)
    application = create_app(settings)
    async with (
        application.router.lifespan_context(application),
        httpx2.AsyncClient(transport=httpx2.ASGITransport(app=application), base_url="http://bench") as http,
    ):
        created = await http.post("/v1/assistants", json={"model": "offline"})
        assistant_id = created.json()["id"]
        body = {
            "assistant_id": assistant_id,
            "stream": True,
            "thread": {"messages": [{"role": "user", "content": "hi"}]},
        }

        async def client(count: int) -> None:
            for _ in range(count):
                answer = await http.post("/v1/threads/runs", json=body)
                assert b"event: thread.run.completed" in answer.content, answer.content[-300:]

        await client(20)  # warm
        begun = [0]
        engine = application.state.runtime.engine.sync_engine
        event.listen(engine, "begin", lambda _connection: begun.__setitem__(0, begun[0] + 1))
        statements = [0]
        event.listen(engine, "before_cursor_execute", lambda *_args: statements.__setitem__(0, statements[0] + 1))
        process, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(client(runs // clients) for _ in range(clients)))
        done = runs // clients * clients
        print(
            f"{clients:2} at a time: process CPU {(time.process_time() - process) * 1e3 / done:.2f} ms/run, "
            f"wall {(time.perf_counter() - wall) * 1e3 / done:.2f} ms/run, {begun[0] / done:.2f} write transactions "
            f"and {statements[0] / done:.2f} statements in them per run (load {os.getloadavg()[0]:.1f})",
            flush=True,
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", default="params,raw,checkout,heldtext,held,heldsess,core,session,runtime")
    parser.add_argument("--profile", help="a layer: print cProfile's top functions for it")
    parser.add_argument("--runs", type=int, default=0, help="only: whole streamed runs through the app, in process")
    parser.add_argument("--clients", type=int, default=1, help="with --runs: runs at a time")
    args = parser.parse_args()
    if args.runs:
        with tempfile.TemporaryDirectory() as folder:
            await _whole_runs(folder, args.runs, args.clients)
        return
    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(data_dir=Path(folder), database_url=f"sqlite+aiosqlite:///{folder}/bench.db")
        runtime = await Runtime.start(settings)
        async with runtime.engine.begin() as connection:
            await connection.run_sync(_METADATA.create_all)
        raw = await aiosqlite.connect(f"{folder}/bench.db", isolation_level=None)
        await raw.execute("PRAGMA synchronous=NORMAL")
        try:
            layers = await _layers(runtime, raw)
            if args.profile:
                await _measure(layers[args.profile], 100)
                profile = cProfile.Profile(time.thread_time)  # CPU of the loop's thread, not wall
                profile.enable()
                await _measure(layers[args.profile], args.transactions)
                profile.disable()
                stats = pstats.Stats(profile)
                stats.sort_stats("tottime").print_stats(45)
                stats.sort_stats("cumulative").print_stats(60)
                return
            load = os.getloadavg()[0]
            print(f"load {load:.1f}; µs per transaction: loop-thread CPU / process CPU / wall")
            for round_ in range(args.rounds):
                for name in args.layers.split(","):
                    thread, process, wall = await _measure(layers[name], args.transactions)
                    print(f"round {round_ + 1} {name:8} {thread:7.1f} {process:7.1f} {wall:7.1f}", flush=True)
            print(f"load {os.getloadavg()[0]:.1f}")
        finally:
            await raw.close()
            await runtime.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
