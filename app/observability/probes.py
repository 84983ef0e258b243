"""Readiness: is the database reachable, is the run worker of this process
alive and claiming, can code_interpreter run? (GET /readyz; /healthz only
says the process answers.)

Ready means the database answered and, when this process has a worker, its
loop completed a round recently. The sandbox is reported but does not make
the server unready: everything else still works without it.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel
from sqlalchemy import text

import app
from app import db, sandbox

if TYPE_CHECKING:
    from app.runtime import Runtime
    from app.settings import Settings
    from app.worker import Worker

DATABASE_TIMEOUT_SECONDS = 2.0
# A loop round waits up to worker_poll_seconds, then claims; a worker is
# stuck when no round completed for a few intervals plus this slack.
WORKER_STALE_SLACK_SECONDS = 2.0


class DatabaseCheck(BaseModel):
    ok: bool
    latency_ms: float | None = None
    error: str | None = None


class WorkerCheck(BaseModel):
    ok: bool
    in_process: bool
    detail: str
    seconds_since_last_loop: float | None = None
    runs_executing: int | None = None
    last_error: str | None = None


class SandboxCheck(BaseModel):
    available: bool
    mode: Literal["bwrap", "none"]
    detail: str


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    version: str
    database: DatabaseCheck
    worker: WorkerCheck
    sandbox: SandboxCheck


async def readiness(runtime: Runtime) -> Readiness:
    database = await check_database(runtime)
    worker = check_worker(runtime.worker, runtime.settings)
    ready = database.ok and worker.ok
    return Readiness(
        status="ready" if ready else "not ready",
        version=app.__version__,
        database=database,
        worker=worker,
        sandbox=check_sandbox(runtime.settings),
    )


async def check_database(runtime: Runtime) -> DatabaseCheck:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(DATABASE_TIMEOUT_SECONDS), runtime.engine.connect() as connection:
            if db.is_sqlite(runtime.settings.resolved_database_url()):
                # Below SQLAlchemy: its transactions on SQLite begin by taking
                # the write lock (app/db.py), which a writer of another process
                # may hold for the whole busy timeout; a plain read in WAL mode
                # answers meanwhile, and is what "reachable" means here.
                raw = (await connection.get_raw_connection()).driver_connection
                assert raw is not None
                await (await raw.execute("SELECT 1")).close()
            else:
                await connection.execute(text("SELECT 1"))
    except TimeoutError:
        return DatabaseCheck(ok=False, error=f"no answer within {DATABASE_TIMEOUT_SECONDS:g} s")
    except Exception as exc:
        return DatabaseCheck(ok=False, error=_describe(exc))
    return DatabaseCheck(ok=True, latency_ms=round((time.perf_counter() - started) * 1000, 1))


def check_worker(worker: Worker | None, settings: Settings) -> WorkerCheck:
    if worker is None:
        detail = "not in this process"
        if not settings.embedded_worker:
            detail += " (ASSISTANTS_EMBEDDED_WORKER=false: standalone `worker` processes execute the runs)"
        return WorkerCheck(ok=True, in_process=False, detail=detail)
    stale_after = 3 * worker.poll_seconds + WORKER_STALE_SLACK_SECONDS
    since = time.monotonic() - worker.last_loop_at
    # A round that failed (database errors) sets last_error; one that hangs
    # (a lock, a dead connection) stops the heartbeat.
    claiming = since <= stale_after and worker.last_error is None
    if claiming:
        detail = "alive and claiming"
    elif worker.last_error is not None:
        detail = "its last loop round failed: not claiming"
    else:
        detail = f"no loop round completed for {since:.1f} s (stuck: a lock or a connection that does not answer)"
    return WorkerCheck(
        ok=claiming,
        in_process=True,
        detail=detail,
        seconds_since_last_loop=round(since, 3),
        runs_executing=worker.executing,
        last_error=worker.last_error,
    )


def check_sandbox(settings: Settings) -> SandboxCheck:
    """What code_interpreter needs, checked without starting a session (the
    same launcher settings the sandbox manager uses)."""
    launcher = sandbox.launcher_from(settings)
    problems = []
    if launcher.uid is not None and launcher.setpriv is None:  # root: sessions switch uid with it
        problems.append("setpriv (util-linux) is not installed")
    if launcher.mode == "none":
        if problems:
            return SandboxCheck(available=False, mode="none", detail="; ".join(problems))
        return SandboxCheck(available=True, mode="none", detail="WITHOUT isolation (ASSISTANTS_SANDBOX=none)")
    if launcher.bwrap is None:
        problems.append("bubblewrap (bwrap) is not installed")
    if not (launcher.venv / "bin" / "python").exists():
        problems.append(f"no sandbox Python at {launcher.venv} (run the sandbox setup)")
    if problems:
        return SandboxCheck(available=False, mode="bwrap", detail="; ".join(problems))
    return SandboxCheck(available=True, mode="bwrap", detail="bubblewrap isolation")


def _describe(exc: BaseException) -> str:
    # Driver errors can be long (SQL, parameters); the first line says what failed.
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}"[:300]
