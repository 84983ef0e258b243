"""Hand-started server processes on one database (not `serve --workers N`):
a stream in the process that executes a run stays true to the run's log
when another process appends to the run (app/sqlite_peers.py, issue 17)."""

from __future__ import annotations

import json
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx2
import pytest

from app import sqlite_peers
from tests import test_cli
from tests.test_cli import STOP_TIMEOUT, Server, clean_env, free_port, running_server

pytestmark = pytest.mark.timeout(120)
database_args = test_cli.database_args  # the fixture: SQLite, and a fresh embedded-PostgreSQL database

DEADLINE = 30.0
Frame = tuple[int | None, str, Any]


def _frames(lines: Any) -> Any:
    """(id, event, data) of each server-sent event, as they arrive."""
    fields: dict[str, str] = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
            continue
        if "event" in fields:
            data = fields.get("data", "")
            parsed = json.loads(data) if data.startswith("{") else data  # `done` carries [DONE]
            yield (int(fields["id"]) if "id" in fields else None, fields["event"], parsed)
        fields = {}


def _wait_for_log(server: Server, pattern: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not re.search(pattern, server.log()):
        assert time.monotonic() < deadline, f"never logged {pattern!r}:\n{server.log()}"
        assert server.process.poll() is None, server.log()
        time.sleep(0.02)


def test_a_stream_stays_true_to_the_log_when_another_process_cancels_its_run(
    tmp_path: Path, database_args: list[str]
) -> None:
    data = ["--data-dir", str(tmp_path / "data"), *database_args]
    executor_port, replica_port = free_port(), free_port()
    sqlite = not database_args
    with running_server(tmp_path, "--port", str(executor_port), *data, port=executor_port) as executor:
        sdk = executor.sdk()
        assistant = sdk.beta.assistants.create(model="gpt-4o")
        # The second process: an API replica on the same database (it executes nothing).
        replica_env = clean_env(ASSISTANTS_EMBEDDED_WORKER="false")
        with running_server(
            tmp_path, "--port", str(replica_port), *data, port=replica_port, env=replica_env
        ) as replica:
            if sqlite:
                _wait_for_log(executor, "another server process opened the SQLite database")
            # 8 s of answer, cancelled at its 30th delta (0.6 s): the cancel,
            # sent through the other process, lands long before the end on a
            # loaded machine too.
            thread = sdk.beta.threads.create(messages=[{"role": "user", "content": "[[delay 20]] [[tokens 400]]"}])
            streamed: list[Frame] = []
            with httpx2.stream(
                "POST",
                f"{executor.base_url}/threads/{thread.id}/runs",
                json={"assistant_id": assistant.id, "stream": True},
                headers={"Authorization": "Bearer x", "OpenAI-Beta": "assistants=v2"},
                timeout=DEADLINE,
            ) as response:
                assert response.status_code == 200, response.read()
                for frame in _frames(response.iter_lines()):
                    streamed.append(frame)
                    if [name for _id, name, _data in streamed].count("thread.message.delta") == 30:
                        run_id = next(data["id"] for _id, name, data in streamed if name == "thread.run.created")
                        # Appended by the replica while the executor numbers and writes deltas.
                        with replica.sdk() as client:
                            client.beta.threads.runs.cancel(run_id, thread_id=thread.id)
            log = httpx2.get(
                f"{replica.base_url}/threads/{thread.id}/runs/{run_id}/events",
                headers={"Authorization": "Bearer x"},
                timeout=DEADLINE,
            )
            logged = list(_frames(log.iter_lines()))
            names = [name for _id, name, _data in streamed]
            assert "thread.run.cancelling" in names and names[-2:] == ["thread.run.cancelled", "done"], names
            assert streamed == logged  # every event once, in the log's order, with the log's ids
            replica.process.send_signal(signal.SIGTERM)
            assert replica.process.wait(timeout=STOP_TIMEOUT) == 0
        if sqlite:  # alone again: deltas reach this process's streams at once, as before
            _wait_for_log(executor, "the only server process on the SQLite database again")
            with sdk.beta.threads.create_and_run_stream(
                assistant_id=assistant.id, thread={"messages": [{"role": "user", "content": "again"}]}
            ) as stream:
                stream.until_done()
                assert stream.get_final_run().status == "completed"
        assert executor.terminate() == 0
        assert "Traceback" not in executor.log() + replica.log()


def _executors(database_args: list[str], data_dir: Path, run_ids: list[str]) -> dict[str, int]:
    """The pid of the process executing each run, watched while they execute."""
    from tests.test_workers import _lease_owner

    found: dict[str, int] = {}
    deadline = time.monotonic() + DEADLINE
    while len(found) < len(run_ids):
        assert time.monotonic() < deadline, f"runs never seen executing: {set(run_ids) - set(found)}"
        for run_id in set(run_ids) - set(found):
            owner = _lease_owner(database_args, data_dir, run_id)
            if owner is not None and not owner.startswith("reserved:"):
                found[run_id] = int(owner.split(":")[1])
        time.sleep(0.01)
    return found


def test_runs_are_executed_by_the_process_whose_api_created_them(tmp_path: Path, database_args: list[str]) -> None:
    """Two serving processes on one database, each creating runs at once: each
    run is executed where it was created (its stream and polls are then
    answered in-process), though the other process's worker looks for work
    every 50 ms and would otherwise take any queued run it finds."""
    data_dir = tmp_path / "data"
    data = ["--data-dir", str(data_dir), *database_args]
    # A long reservation: the creator's claim may wait on a loaded machine's database.
    env = clean_env(ASSISTANTS_WORKER_POLL_SECONDS="0.05", ASSISTANTS_RUN_CLAIM_AFFINITY_SECONDS="10")
    ports = free_port(), free_port()
    with (
        running_server(tmp_path, "--port", str(ports[0]), *data, port=ports[0], env=env) as first,
        running_server(tmp_path, "--port", str(ports[1]), *data, port=ports[1], env=env) as second,
    ):
        with first.sdk() as sdk:
            assistant = sdk.beta.assistants.create(model="gpt-4o")

        def create(server: Server) -> tuple[str, str]:
            with server.sdk() as client:
                run = client.beta.threads.create_and_run(
                    assistant_id=assistant.id,
                    # Minutes of answer, cancelled below: a run still executes when
                    # the test looks for its executor, however late (a run of 1 s
                    # could end unseen on a loaded machine).
                    thread={"messages": [{"role": "user", "content": "[[delay 100]] [[tokens 3000]]"}]},
                )
                return run.id, run.thread_id

        servers = [first, second] * 6
        with ThreadPoolExecutor(len(servers)) as pool:
            created = list(pool.map(create, servers))
        run_ids = [run_id for run_id, _thread_id in created]
        executors = _executors(database_args, data_dir, run_ids)
        created_by = {run_id: server.process.pid for run_id, server in zip(run_ids, servers, strict=True)}
        assert executors == created_by
        for (run_id, thread_id), server in zip(created, servers, strict=True):
            with server.sdk() as client:  # so that the processes stop at once, with nothing to drain
                client.beta.threads.runs.cancel(run_id, thread_id=thread_id)
        assert first.terminate() == 0 and second.terminate() == 0


def test_every_spelling_of_one_sqlite_file_meets_on_one_lock_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Processes started from other folders, or naming the file as a URI
    (?uri=true), must join the same lock file, or each would think itself
    alone and hand deltas to streams before writing them."""
    database = tmp_path / "one db.sqlite"
    monkeypatch.chdir(tmp_path)
    spellings = [
        f"sqlite+aiosqlite:///{database}",
        "sqlite+aiosqlite:///one db.sqlite",
        f"sqlite+aiosqlite:///file:{quote(str(database))}?uri=true",
    ]
    paths = set()
    for url in spellings:
        peers = sqlite_peers.for_url(url)
        assert peers is not None, url
        paths.add(peers.path)
    assert paths == {Path(f"{database}-processes.lock")}
    assert sqlite_peers.for_url("sqlite+aiosqlite:///file::memory:?cache=shared&uri=true") is None
