"""The server skips alembic when the schema is current (app/db.py): that
relies on db.head_revision() naming the same head as alembic itself."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text

from app import db, preflight
from app.settings import Settings


def test_head_revision_is_alembics_head() -> None:
    config = Config()
    config.set_main_option("script_location", str(db.MIGRATIONS_DIR))
    assert db.head_revision() == ScriptDirectory.from_config(config).get_current_head()


_PROGRAM = """
import asyncio, sys
from app import db

async def main(url):
    engine = db.create_engine(url)
    try:
        await db.migrate(engine)
    finally:
        await engine.dispose()
    print("alembic" in sys.modules)

asyncio.run(main(sys.argv[1]))
"""


def _migrate_in_a_process(url: str) -> bool:
    """Whether a fresh process had to import alembic to migrate ``url``."""
    done = subprocess.run([sys.executable, "-c", _PROGRAM, url], capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip().splitlines()[-1] == "True"


def test_a_current_database_is_not_migrated_again(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'assistants.db'}"
    assert _migrate_in_a_process(url) is True  # a new database: alembic creates the schema
    assert _migrate_in_a_process(url) is False  # now current: nothing to import or run


_SERVE_PREPARATION = """
import os, sys
from app import __main__ as cli, preflight, supervisor
from app.settings import Settings

settings = Settings(database_url=sys.argv[1], data_dir=sys.argv[2])
migrations = []
migrate = supervisor.migrate
supervisor.migrate = lambda settings: migrations.append(1) or migrate(settings)
try:
    cli.prepare_alone(settings)
except preflight.StartupError as exc:
    print("StartupError:", exc)
print("alembic" in sys.modules)
# No process left beside the server (multiprocessing's spawn leaves its resource tracker).
print(open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split())
print(len(migrations))  # child processes started to migrate
"""


def _prepare_to_serve(url: str, data_dir: Path, *, cwd: Path | None = None) -> list[str]:
    """What a fresh process printed after a single server's start-up checks
    (with ``cwd``: started there, as a console script starts, its working
    directory not on its import path: -P)."""
    done = subprocess.run(
        [sys.executable, *(["-P"] if cwd else []), "-c", _SERVE_PREPARATION, url, str(data_dir)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout.strip().splitlines()


def test_a_single_server_migrates_a_new_database_in_another_process(tmp_path: Path) -> None:
    path = tmp_path / "assistants.db"
    assert _prepare_to_serve(f"sqlite+aiosqlite:///{path}", tmp_path) == ["False", "[]", "1"]
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [(db.head_revision(),)]


async def _stamp(url: str, revision: str) -> None:
    engine = db.create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                text("CREATE TABLE IF NOT EXISTS alembic_version (version_num VARCHAR(32) NOT NULL)")
            )
            await connection.execute(text("DELETE FROM alembic_version"))
            await connection.execute(text("INSERT INTO alembic_version VALUES (:revision)"), {"revision": revision})
    finally:
        await engine.dispose()


def test_a_current_database_starts_no_migration(database_url: str, tmp_path: Path) -> None:
    _prepare_to_serve(database_url, tmp_path)  # SQLite: a new file, migrated; PostgreSQL: made current
    assert _prepare_to_serve(database_url, tmp_path) == ["False", "[]", "0"]


def test_the_migrating_process_failure_is_the_servers_startup_error(database_url: str, tmp_path: Path) -> None:
    asyncio.run(_stamp(database_url, "9999_from_the_future"))
    printed = _prepare_to_serve(database_url, tmp_path)
    assert printed[1:] == ["False", "[]", "1"]
    assert printed[0].startswith("StartupError: "), printed
    assert "9999_from_the_future" in printed[0]


def test_the_migrating_process_imports_the_servers_app_not_one_in_its_directory(tmp_path: Path) -> None:
    """A server started in a project whose directory has an app.py of its
    own (a console script does not import from its working directory): the
    migrating child imports the server's package too, not that module."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "app.py").write_text('print("the project\'s own app.py")\n')
    path = tmp_path / "assistants.db"
    assert _prepare_to_serve(f"sqlite+aiosqlite:///{path}", tmp_path, cwd=project) == ["False", "[]", "1"]
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [(db.head_revision(),)]


def test_an_ephemeral_server_migrates_its_new_database_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve --ephemeral`` (the pytest plugin's server): always a new
    database, for a test session, where the child's second of start-up
    counts and idle memory does not: migrated in its own process."""
    from app import __main__ as cli
    from app import supervisor

    def no_child(_settings: Settings) -> None:
        raise AssertionError("a child process started to migrate")

    served: list[bool] = []

    def serve(settings: Settings, *, listener: socket.socket, **_options: object) -> int:
        listener.close()
        served.append(preflight.database_is_current(settings))
        return 0

    monkeypatch.setattr(supervisor, "migrate", no_child)
    monkeypatch.setattr(cli, "serve", serve)
    arguments = argparse.Namespace(data_dir=None, ready_file=None)
    assert cli.serve_ephemeral(Settings(), arguments) == 0 and served == [True]


# A server that migrates: alone (migrate()'s child interpreter), or as
# `serve --workers N`'s supervisor (prepare()'s spawned checks process).
_MIGRATING_SERVER = """
import sys
from app import supervisor
from app.settings import Settings

if __name__ == "__main__":  # (spawn's child imports this script again)
    supervisor.{how}(Settings(database_url=sys.argv[1], data_dir=sys.argv[2]))
"""


def _migrating_child(parent: int, database: Path) -> int | None:
    """The child of ``parent`` that has ``database`` open (the migration, connected), if any."""
    try:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return None
    for child in children:
        with contextlib.suppress(OSError):  # it ended meanwhile
            if any(os.path.realpath(fd) == str(database) for fd in Path(f"/proc/{child}/fd").iterdir()):
                return int(child)
    return None


def _alive(pid: int) -> bool:
    """Running (a zombie no reaper has collected yet has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _within(seconds: float, condition: Callable[[], Any], what: str) -> Any:
    """Polls ``condition`` until it holds (its value) or ``seconds`` pass (fails saying ``what``)."""
    deadline = time.monotonic() + seconds
    while not (found := condition()):
        assert time.monotonic() < deadline, f"no {what} within {seconds:g} s"
        time.sleep(0.02)
    return found


@pytest.mark.parametrize("how", ["migrate", "prepare"])
def test_the_migrating_process_dies_with_the_server(tmp_path: Path, how: str) -> None:
    """A server killed (SIGKILL) while its child process migrates the
    database takes the migration with it (PR_SET_PDEATHSIG), instead of
    leaving it running alone: a single server's migrating child, and the
    checks process of `serve --workers N`. The migration here waits for
    SQLite's write lock, which the test holds (up to the busy timeout, 30 s,
    without)."""
    database = (tmp_path / "assistants.db").resolve()
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")  # readers pass; the migration's writes wait
    holder.execute("BEGIN IMMEDIATE")
    logs = (tmp_path / "server.log").open("wb")
    script = tmp_path / "server.py"
    script.write_text(_MIGRATING_SERVER.format(how=how))
    server = subprocess.Popen(
        [sys.executable, str(script), f"sqlite+aiosqlite:///{database}", str(tmp_path / "data")],
        stdout=logs,
        stderr=logs,
    )
    child: int | None = None
    try:
        child = _within(60, lambda: _migrating_child(server.pid, database), "migrating child")
        server.kill()
        server.wait(timeout=10)
        _within(10, lambda: not _alive(child), "end of the migrating child after its server's")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)
        holder.close()
        logs.close()
