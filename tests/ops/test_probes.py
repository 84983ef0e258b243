"""GET /healthz and /readyz: open without API keys, 503 with the reason when
the database or the worker of this process is not doing its job."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx2
import pytest
from fastapi import FastAPI
from sqlalchemy.engine import make_url

import app as package
from app.main import create_app
from app.sandbox import launch
from app.settings import Settings
from tests import pg

DEADLINE_SECONDS = 30.0


@pytest.fixture
async def keyed_client(settings: Settings) -> AsyncIterator[httpx2.AsyncClient]:
    application = create_app(settings.model_copy(update={"api_keys": ["sk-only"]}))
    async with (
        application.router.lifespan_context(application),
        httpx2.AsyncClient(transport=httpx2.ASGITransport(app=application), base_url="http://testserver") as client,
    ):
        yield client


@asynccontextmanager
async def started(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx2.AsyncClient]]:
    application = create_app(settings)
    async with (
        application.router.lifespan_context(application),
        httpx2.AsyncClient(transport=httpx2.ASGITransport(app=application), base_url="http://testserver") as client,
    ):
        yield application, client


async def wait_for(
    probe: Callable[[], Awaitable[httpx2.Response]],
    status: int,
    until: Callable[[dict[str, Any]], bool] = lambda _body: True,
) -> dict[str, Any]:
    """The first answer with ``status`` whose body passes ``until``."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        response = await probe()
        if response.status_code == status:
            body: dict[str, Any] = response.json()
            if until(body):
                return body
        if time.monotonic() > deadline:
            pytest.fail(f"/readyz still {response.status_code}: {response.text}")
        await asyncio.sleep(0.05)


async def test_probes_answer_without_an_api_key(keyed_client: httpx2.AsyncClient) -> None:
    health = await keyed_client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    assert health.headers["x-request-id"].startswith("req_")
    # Waited for: on a loaded machine one probe's SELECT 1 may miss its 2-s
    # limit, a 503 for another reason (a probe wanting the key is a 401 each time).
    await wait_for(lambda: keyed_client.get("/readyz"), 200)
    # The API itself still wants the key.
    assert (await keyed_client.get("/v1/assistants")).status_code == 401


async def test_ready_with_database_worker_and_version(plain: httpx2.AsyncClient) -> None:
    # Waited for: on a loaded machine one probe's SELECT 1 may miss its 2-s limit.
    body = await wait_for(lambda: plain.get("/readyz"), 200)
    assert body["status"] == "ready"
    assert body["version"] == package.__version__
    assert body["database"]["ok"] is True and body["database"]["latency_ms"] >= 0
    worker = body["worker"]
    assert worker["ok"] is True and worker["in_process"] is True
    assert worker["detail"] == "alive and claiming"
    assert worker["last_error"] is None and worker["runs_executing"] == 0
    sandbox = body["sandbox"]
    assert isinstance(sandbox["available"], bool) and sandbox["mode"] == "bwrap" and sandbox["detail"]


async def test_a_replica_without_worker_says_so(settings: Settings) -> None:
    async with started(settings.model_copy(update={"embedded_worker": False})) as (_app, client):
        # Waited for: on a loaded machine one probe's SELECT 1 may miss its 2-s limit.
        worker = (await wait_for(lambda: client.get("/readyz"), 200))["worker"]
        assert worker["in_process"] is False and worker["ok"] is True
        assert worker["detail"].startswith("not in this process")
        assert "ASSISTANTS_EMBEDDED_WORKER=false" in worker["detail"]


async def test_database_down_is_503(settings: Settings, request: pytest.FixtureRequest) -> None:
    async with started(settings.model_copy(update={"embedded_worker": False})) as (application, client):
        # Ready first (waited for: one probe's SELECT 1 may miss its 2-s limit
        # on a loaded machine), so that the 503 below is the database's going.
        await wait_for(lambda: client.get("/readyz"), 200)
        await take_database_away(application, settings, request)
        body = await wait_for(lambda: client.get("/readyz"), 503)
        assert body["status"] == "not ready"
        assert body["database"]["ok"] is False and body["database"]["error"]
        # Liveness does not depend on the database.
        assert (await client.get("/healthz")).status_code == 200


async def test_worker_not_claiming_is_reported(settings: Settings) -> None:
    async with started(settings.model_copy(update={"worker_poll_seconds": 0.05})) as (_app, client):
        await wait_for(lambda: client.get("/readyz"), 200)
        async with runs_table_locked(settings):
            # The worker's claim waits on the lock; the database still answers.
            # (Waited for together: on a loaded machine one probe's SELECT 1
            # may miss its 2-s limit, a 503 for another reason.)
            def stuck_but_reachable(body: dict[str, Any]) -> bool:
                return bool(body["database"]["ok"] and not body["worker"]["ok"])

            body = await wait_for(lambda: client.get("/readyz"), 503, until=stuck_but_reachable)
            worker = body["worker"]
            assert worker["ok"] is False and worker["in_process"] is True
            assert worker["detail"].startswith("no loop round completed")
            assert worker["seconds_since_last_loop"] > 0.15
        body = await wait_for(lambda: client.get("/readyz"), 200)
        assert body["worker"]["detail"] == "alive and claiming"


# --- making the database misbehave, for real ------------------------------------


def _is_sqlite(settings: Settings) -> bool:
    return settings.resolved_database_url().startswith("sqlite")


def _asyncpg_dsn(settings: Settings) -> str:
    return make_url(settings.resolved_database_url()).set(drivername="postgresql").render_as_string(False)


def _replace_with_directory(path: Path) -> None:
    for leftover in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        leftover.unlink(missing_ok=True)
    path.mkdir()


async def take_database_away(application: FastAPI, settings: Settings, request: pytest.FixtureRequest) -> None:
    url = make_url(settings.resolved_database_url())
    if _is_sqlite(settings):
        # Close the pooled connections, then put a directory where the file was.
        await application.state.runtime.engine.dispose()
        path = Path(str(url.database))
        _replace_with_directory(path)
        request.addfinalizer(lambda: shutil.rmtree(path, ignore_errors=True))
    else:
        server: pg.EmbeddedPostgres = request.getfixturevalue("postgres")
        await asyncio.to_thread(server.drop_database, str(url.database))


@asynccontextmanager
async def runs_table_locked(settings: Settings) -> AsyncIterator[None]:
    """Hold an exclusive lock on the runs table from another connection."""
    if _is_sqlite(settings):
        path = str(make_url(settings.resolved_database_url()).database)
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # In a thread: waiting for the lock on the event loop's thread would
        # stall a server transaction that holds it (a deadlock until the timeout).
        await asyncio.to_thread(connection.execute, "BEGIN IMMEDIATE")  # the write lock: every writer waits
        try:
            yield
        finally:
            await asyncio.to_thread(connection.execute, "ROLLBACK")
            connection.close()
        return
    postgres = await asyncpg.connect(_asyncpg_dsn(settings))
    transaction = postgres.transaction()
    await transaction.start()
    try:
        await postgres.execute("LOCK TABLE runs IN ACCESS EXCLUSIVE MODE")
        yield
    finally:
        await transaction.rollback()
        await postgres.close()


async def test_sandbox_state_is_reported_not_required(settings: Settings, tmp_path: Path) -> None:
    missing = settings.model_copy(update={"sandbox_python": tmp_path / "no-such-venv"})
    async with started(missing) as (_app, client):
        # Ready all the same (waited for: one probe's SELECT 1 may miss its
        # 2-s limit on a loaded machine).
        sandbox = (await wait_for(lambda: client.get("/readyz"), 200))["sandbox"]
        assert sandbox["available"] is False
        assert f"no sandbox Python at {tmp_path / 'no-such-venv'}" in sandbox["detail"]
    async with started(settings.model_copy(update={"sandbox": "none"})) as (_app, client):
        sandbox = (await client.get("/readyz")).json()["sandbox"]
        assert sandbox == {"available": True, "mode": "none", "detail": "WITHOUT isolation (ASSISTANTS_SANDBOX=none)"}


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root server switches sessions' users with setpriv")
@pytest.mark.parametrize("mode", ["bwrap", "none"])
async def test_a_root_server_without_setpriv_reports_the_sandbox_unavailable(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Every session would be refused ("setpriv (util-linux) is not
    installed"): /readyz says so rather than the sandbox being available."""
    monkeypatch.setattr(launch, "find_setpriv", lambda: None)
    async with started(settings.model_copy(update={"sandbox": mode})) as (_app, client):
        sandbox = (await client.get("/readyz")).json()["sandbox"]
    assert sandbox["available"] is False and "setpriv (util-linux) is not installed" in sandbox["detail"]
