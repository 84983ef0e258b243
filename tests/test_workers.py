"""``serve --workers 2`` (app/supervisor.py) with real processes: both serve
runs and streams from the one port, a serving process killed mid-run is
replaced while the other keeps answering and resumes its run, and SIGTERM
stops them all."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from app import preflight, supervisor
from app.settings import Settings
from tests import pg, test_cli
from tests.test_cli import (
    STOP_TIMEOUT,
    Server,
    _poll_run,
    assert_one_line_failure,
    clean_env,
    free_port,
    run_cli,
    running_server,
)

pytestmark = pytest.mark.timeout(180)
database_args = test_cli.database_args  # the fixture: SQLite, and a fresh embedded-PostgreSQL database

DEADLINE = 60.0
_SERVING = re.compile(r"serving the Assistants API at .*; process (\d)/2, pid (\d+)\)")
TERMINAL = {"completed", "failed", "cancelled", "expired", "incomplete", "requires_action"}


def _serving_pids(server: Server, count: int) -> list[int]:
    """The pids of the serving processes announced so far, once there are ``count``."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        pids = [int(match.group(2)) for match in _SERVING.finditer(server.log())]
        if len(pids) >= count:
            return pids
        assert server.process.poll() is None, server.log()
        time.sleep(0.05)
    pytest.fail(f"{count} serving processes did not start:\n{server.log()}")


def _lease_owner(extra_args: list[str], data_dir: Path, run_id: str) -> str | None:
    """The run's lease holder, read from the database (``host:pid:token``)."""
    if not extra_args:
        with sqlite3.connect(data_dir / "assistants.db") as connection:
            row = connection.execute("SELECT lease_owner FROM runs WHERE id = ?", (run_id,)).fetchone()
            return row[0] if row else None

    return pg.lease_owner(extra_args[1], run_id)


def _executing_pid(extra_args: list[str], data_dir: Path, run_id: str) -> int:
    """The pid of the process whose lease the run holds. Polled, not read
    once: with a 1 s lease, a process on a loaded machine may give the run
    up and hand it back (no owner) until a process claims it again."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        owner = _lease_owner(extra_args, data_dir, run_id)
        if owner:
            return int(owner.split(":")[1])
        time.sleep(0.02)
    pytest.fail(f"no process took run {run_id}")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _streamed_answer(sdk: openai.OpenAI, assistant_id: str, text: str) -> str:
    with sdk.beta.threads.create_and_run_stream(
        assistant_id=assistant_id, thread={"messages": [{"role": "user", "content": text}]}
    ) as stream:
        stream.until_done()
        [message] = stream.get_final_messages()
    return message.content[0].text.value  # type: ignore[union-attr]


def test_two_serving_processes_share_the_port_and_survive_a_killed_one(
    tmp_path: Path, database_args: list[str]
) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    args = ["--port", str(port), "--data-dir", str(data_dir), "--workers", "2", *database_args]
    env = clean_env(ASSISTANTS_RUN_LEASE_SECONDS="1", ASSISTANTS_WORKER_POLL_SECONDS="0.1")
    with running_server(tmp_path, *args, port=port, env=env) as server:
        first = _serving_pids(server, 2)
        assert len(set(first)) == 2 and server.process.pid not in first
        sdk = server.sdk()
        assistant = sdk.beta.assistants.create(model="gpt-4o")
        for number in range(6):  # new connections each: the kernel hands them to either process
            with server.sdk() as client:
                run = client.beta.threads.create_and_run_poll(
                    assistant_id=assistant.id,
                    thread={"messages": [{"role": "user", "content": f"run {number}"}]},
                    poll_interval_ms=20,
                )
                assert run.status == "completed", run.last_error
            with server.sdk() as client:
                assert _streamed_answer(client, assistant.id, f"stream {number}") == f"You said: stream {number}"

        # A long run; the process executing it is killed (SIGKILL: no shutdown code runs).
        thread = sdk.beta.threads.create(messages=[{"role": "user", "content": "[[delay 20]] [[tokens 150]]"}])
        slow = sdk.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id)
        _poll_run(sdk, thread.id, slow.id, {"in_progress"})
        doomed = _executing_pid(database_args, data_dir, slow.id)
        assert doomed in first
        os.kill(doomed, signal.SIGKILL)

        # The other process answers at once, and its reaper resumes the run.
        with server.sdk() as client:
            assert _streamed_answer(client, assistant.id, "still there?") == "You said: still there?"
            resumed = _poll_run(client, thread.id, slow.id, TERMINAL)
            assert resumed.status == "completed", resumed.last_error
            [answer] = [m for m in client.beta.threads.messages.list(thread.id).data if m.role == "assistant"]
            assert len(answer.content[0].text.value.split()) == 150  # type: ignore[union-attr]

        # The supervisor replaced the killed process.
        replaced = _serving_pids(server, 3)
        assert len(set(replaced)) == 3 and replaced[:2] == first
        with server.sdk() as client:
            assert _streamed_answer(client, assistant.id, "again") == "You said: again"
        sdk.close()

        assert server.terminate() == 0
        deadline = time.monotonic() + STOP_TIMEOUT
        while not all(_gone(pid) for pid in replaced):
            assert time.monotonic() < deadline, "serving processes outlived their supervisor"
            time.sleep(0.05)
        assert "Traceback" not in server.log()


def test_ephemeral_serves_from_one_process(tmp_path: Path) -> None:
    result = test_cli.run_cli("serve", "--ephemeral", "--workers", "2", "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 1
    assert "--ephemeral serves from one process: leave out --workers" in result.stderr


def test_the_supervisor_imports_none_of_the_server() -> None:
    """`serve --workers N`'s supervisor runs the CLI module and binds the port
    (preflight.bind): neither may import the server, which only its serving
    processes hold (~50 MiB of the supervisor's RSS otherwise)."""
    probe = (
        "import sys, app.__main__, app.preflight, app.supervisor; "
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'fastapi', 'starlette', 'sqlalchemy', 'uvicorn', 'yaml', 'litellm', 'alembic', 'numpy'})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True, env=clean_env()
    )
    assert result.stdout.split() == [], result.stdout


def test_each_serving_processs_socket_gets_a_share_of_new_connections() -> None:
    """One SO_REUSEPORT socket per serving process on the one port: the
    kernel spreads new connections over them (on one shared socket, the
    first process awake took every connection waiting)."""
    sockets = supervisor.listeners(preflight.bind("127.0.0.1", 0), 2)
    clients: list[socket.socket] = []
    try:
        port = sockets[0].getsockname()[1]
        assert [sock.getsockname()[1] for sock in sockets] == [port, port]
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(40)]
        accepted = []
        for listening in sockets:  # (each connection is queued on one socket by now: the handshake is done)
            listening.setblocking(False)
            count = 0
            with contextlib.suppress(BlockingIOError):
                while True:
                    connection, _address = listening.accept()
                    connection.close()
                    count += 1
            accepted.append(count)
        assert sum(accepted) == 40 and min(accepted) > 0, accepted  # all 40 on one socket: 2**-39
    finally:
        for sock in [*clients, *sockets]:
            sock.close()


def test_a_replacements_socket_takes_no_connections_until_its_process_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead process's socket is replaced by one bound but not listening:
    the kernel queues no connections on it through the restart's pause and
    the new process's start (its server listens once it serves)."""
    monkeypatch.setattr(supervisor, "RESTART_PAUSE_SECONDS", 0.0)
    started: list[int] = []
    monkeypatch.setattr(supervisor.Supervisor, "_start", lambda _self, index: started.append(index))
    boss = supervisor.Supervisor(Settings(), supervisor.listeners(preflight.bind("127.0.0.1", 0), 2))
    try:
        assert boss._restart(0) and started == [0]
        assert boss.sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0
        assert boss.sockets[1].getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    finally:
        for sock in boss.sockets.values():
            sock.close()
        boss._wake_read.close()
        boss._wake_write.close()


def test_a_second_server_on_a_workers_servers_port_is_refused(tmp_path: Path) -> None:
    """The port's SO_REUSEPORT group takes no second server: one started on
    a `--workers 2` server's port, with or without --workers, fails with the
    one-line "already in use"."""
    port = free_port()
    args = ["--port", str(port), "--data-dir", str(tmp_path / "data"), "--workers", "2"]
    with running_server(tmp_path, *args, port=port, env=clean_env()) as server:
        _serving_pids(server, 2)
        for extra in (["--workers", "2"], []):
            other = tmp_path / f"other{len(extra)}"
            other.mkdir()
            result = run_cli("serve", "--port", str(port), "--data-dir", str(other / "data"), *extra, cwd=other)
            assert_one_line_failure(result, f"port {port} on 127.0.0.1 is already in use")
        assert server.terminate() == 0
