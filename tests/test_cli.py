"""The command line as users and CI run it: real processes, real sockets, the
official SDK, SIGTERM, and a restart on the same data."""

from __future__ import annotations

import importlib.util
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import uvloop
from alembic.script import ScriptDirectory

from app import db
from app.__main__ import build_parser, load_settings, loop_factory
from app.settings import Settings
from tests import pg

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without ASSISTANTS_* (so a developer's own
    settings cannot leak into the test), plus ``extra``. PYTHONPATH makes the
    child run this working tree even from another directory."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ASSISTANTS_")}
    env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    # The SDK clients sdk() made: closed with the server (running_server), so
    # that no pooled connection's socket is left for a later test's garbage
    # collection to report as unclosed (a ResourceWarning, an error here).
    clients: list[openai.OpenAI] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def sdk(self, api_key: str = "x") -> openai.OpenAI:
        client = openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=10)
        self.clients.append(client)
        return client

    def wait_ready(self) -> None:
        """Poll until any HTTP answer comes back (401 counts: the server is up)."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode} before serving:\n{self.log()}")
            try:
                httpx2.get(f"{self.base_url}/assistants", timeout=1.0)
                return
            except httpx2.TransportError:
                time.sleep(0.05)
        pytest.fail(f"server not ready after {START_TIMEOUT} s:\n{self.log()}")

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=STOP_TIMEOUT)


@contextmanager
def running_server(tmp_path: Path, *args: str, port: int, env: dict[str, str] | None = None) -> Iterator[Server]:
    """Start ``python -m app serve ARGS`` in ``tmp_path``, wait until it
    answers on ``port``, and kill it on the way out if the test did not stop it."""
    log_path = tmp_path / f"server-{secrets.token_hex(4)}.log"
    command = [sys.executable, "-m", "app", "serve", *args]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=env or clean_env(), stdout=log_file, stderr=subprocess.STDOUT
        )
    server = Server(process=process, port=port, log_path=log_path)
    try:
        server.wait_ready()
        yield server
    finally:
        for client in server.clients:
            client.close()
        if process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)


@pytest.fixture(params=["sqlite", "postgres"])
def database_args(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """Extra serve flags: none for SQLite (the default file under --data-dir),
    --database-url for a fresh embedded-PostgreSQL database."""
    if request.param == "sqlite":
        yield []
        return
    server: pg.EmbeddedPostgres = request.getfixturevalue("postgres")
    name = "cli_" + secrets.token_hex(6)
    server.create_database(name)
    try:
        yield ["--database-url", server.url(name)]
    finally:
        server.drop_database(name)


def test_help_lists_commands_and_options() -> None:
    top = run_cli("--help")
    assert top.returncode == 0, top.stderr
    for command in ("serve", "migrate", "worker"):
        assert command in top.stdout
    serve_help = run_cli("serve", "--help")
    assert serve_help.returncode == 0, serve_help.stderr
    for option in ("--host", "--port", "--data-dir", "--database-url", "--config", "--log-level"):
        assert option in serve_help.stdout


def test_serve_round_trip_sigterm_and_restart(tmp_path: Path, database_args: list[str]) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    args = ["--port", str(port), "--data-dir", str(data_dir), *database_args]
    with running_server(tmp_path, *args, port=port) as server:
        sdk = server.sdk()
        assistant = sdk.beta.assistants.create(model="gpt-4o", name="CLI")
        thread = sdk.beta.threads.create()
        message = sdk.beta.threads.messages.create(thread.id, role="user", content="persist me")
        assert [a.id for a in sdk.beta.assistants.list().data] == [assistant.id]
        assert server.terminate() == 0, server.log()
        log = server.log()
    assert "no API keys configured" in log
    assert f"http://127.0.0.1:{port}/v1" in log
    assert "Application shutdown complete" in log

    with running_server(tmp_path, *args, port=port) as server:
        sdk = server.sdk()
        assert sdk.beta.assistants.retrieve(assistant.id).name == "CLI"
        messages = sdk.beta.threads.messages.list(thread.id).data
        assert [m.id for m in messages] == [message.id]
        assert messages[0].content[0].type == "text"
        assert messages[0].content[0].text.value == "persist me"
        assert server.terminate() == 0, server.log()
    if not database_args:
        assert (data_dir / "assistants.db").is_file()


def test_serve_defaults_to_sqlite_under_dot_data(tmp_path: Path) -> None:
    # Only the port is chosen (8000 may be taken here); the host and the data
    # directory are the defaults a newcomer gets.
    port = free_port()
    with running_server(tmp_path, "--port", str(port), port=port) as server:
        assert server.sdk().beta.assistants.list().data == []
        assert server.terminate() == 0, server.log()
    assert (tmp_path / "data" / "assistants.db").is_file()


def test_env_vars_are_honoured(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(ASSISTANTS_PORT=str(port), ASSISTANTS_API_KEYS="sk-one, sk-two")
    with running_server(tmp_path, port=port, env=env) as server:
        with pytest.raises(openai.AuthenticationError):
            server.sdk("sk-wrong").beta.assistants.list()
        assert server.sdk("sk-two").beta.assistants.list().data == []
        assert server.terminate() == 0, server.log()
        assert "no API keys configured" not in server.log()


def test_flags_override_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ASSISTANTS_PORT", "9001")
    monkeypatch.setenv("ASSISTANTS_HOST", "0.0.0.0")  # noqa: S104 - a value under test, nothing binds it
    routing = tmp_path / "models.yaml"
    routing.write_text("model_list: []\n")
    args = build_parser().parse_args(["serve", "--port", "9002", "--config", str(routing)])
    settings = load_settings(args)
    assert (settings.host, settings.port, settings.llm_config) == ("0.0.0.0", 9002, routing)  # noqa: S104


def test_bad_configuration_fails_fast_with_a_message(tmp_path: Path) -> None:
    bad_env = run_cli("serve", env=clean_env(ASSISTANTS_PORT="eighty"), cwd=tmp_path)
    assert bad_env.returncode != 0
    assert "invalid configuration" in bad_env.stderr and "port" in bad_env.stderr
    missing = run_cli("serve", "--config", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert missing.returncode != 0
    assert "model routing file not found" in missing.stderr
    bad_flag = run_cli("serve", "--port", "eighty", cwd=tmp_path)
    assert bad_flag.returncode == 2
    assert "--port" in bad_flag.stderr


def test_migrate_builds_a_fresh_sqlite_database(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "fresh.db"
    for _ in range(2):  # the second run finds nothing to do
        result = run_cli("migrate", "--database-url", f"sqlite+aiosqlite:///{path}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    head = ScriptDirectory(str(db.MIGRATIONS_DIR)).get_current_head()
    with sqlite3.connect(path) as connection:
        versions = connection.execute("SELECT version_num FROM alembic_version").fetchall()
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert versions == [(head,)]
    assert {"assistants", "threads", "messages", "files"} <= tables
    assert not (tmp_path / "data").exists(), "migrate with --database-url must not touch the default data dir"


def _poll_run(sdk: openai.OpenAI, thread_id: str, run_id: str, statuses: set[str]) -> Any:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        run = sdk.beta.threads.runs.retrieve(run_id, thread_id=thread_id)
        if run.status in statuses:
            return run
        time.sleep(0.02)
    pytest.fail(f"run {run_id} never reached {statuses}")


def _start_worker(tmp_path: Path, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    with (tmp_path / "worker.log").open("wb") as log_file:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "app", "worker", *args],
            cwd=tmp_path,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


def test_standalone_worker_executes_an_api_replicas_runs(tmp_path: Path, database_args: list[str]) -> None:
    port = free_port()
    data = ["--data-dir", str(tmp_path / "data"), *database_args]
    api_env = clean_env(ASSISTANTS_EMBEDDED_WORKER="false")
    with running_server(tmp_path, "--port", str(port), *data, port=port, env=api_env) as server:
        sdk = server.sdk()
        assistant = sdk.beta.assistants.create(model="gpt-4o")
        run = sdk.beta.threads.create_and_run(
            assistant_id=assistant.id, thread={"messages": [{"role": "user", "content": "hello"}]}
        )
        assert sdk.beta.threads.runs.retrieve(run.id, thread_id=run.thread_id).status == "queued"
        # On PostgreSQL the API's NOTIFY wakes the worker; SQLite has only polling.
        poll = "0.05" if not database_args else "600"
        worker = _start_worker(tmp_path, data, clean_env(ASSISTANTS_WORKER_POLL_SECONDS=poll))
        try:
            done = _poll_run(sdk, run.thread_id, run.id, {"completed", "failed"})
            assert done.status == "completed", done.last_error
            # A second run, queued while the worker is idle and listening.
            second = sdk.beta.threads.runs.create_and_poll(
                thread_id=run.thread_id, assistant_id=assistant.id, poll_interval_ms=20
            )
            assert second.status == "completed", second.last_error
            # This replica executes no runs, yet streams them, from the run event log (issue 11).
            with sdk.beta.threads.runs.stream(thread_id=run.thread_id, assistant_id=assistant.id) as stream:
                stream.until_done()
                assert stream.get_final_run().status == "completed"
                assert [m.role for m in stream.get_final_messages()] == ["assistant"]
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=STOP_TIMEOUT) == 0
        answer = sdk.beta.threads.messages.list(run.thread_id).data[0]
        assert answer.content[0].text.value == "You said: hello"  # type: ignore[union-attr]


def test_kill_9_mid_run_then_restart_resumes_the_run_and_keeps_the_rest(
    tmp_path: Path, database_args: list[str]
) -> None:
    port = free_port()
    args = ["--port", str(port), "--data-dir", str(tmp_path / "data"), *database_args]
    env = clean_env(ASSISTANTS_RUN_LEASE_SECONDS="1", ASSISTANTS_WORKER_POLL_SECONDS="0.1")
    with running_server(tmp_path, *args, port=port, env=env) as server:
        sdk = server.sdk()
        assistant = sdk.beta.assistants.create(model="gpt-4o")
        thread = sdk.beta.threads.create(messages=[{"role": "user", "content": "first"}])
        first = sdk.beta.threads.runs.create_and_poll(
            thread_id=thread.id, assistant_id=assistant.id, poll_interval_ms=20
        )
        assert first.status == "completed"
        sdk.beta.threads.messages.create(thread.id, role="user", content="[[delay 20]] [[tokens 100]]")
        interrupted = sdk.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id)
        started = _poll_run(sdk, thread.id, interrupted.id, {"in_progress"})
        server.process.kill()  # SIGKILL: no shutdown code runs
        server.process.wait(timeout=STOP_TIMEOUT)
    with running_server(tmp_path, *args, port=port, env=env) as server:
        sdk = server.sdk()
        resumed = _poll_run(
            sdk, thread.id, interrupted.id, {"failed", "completed", "cancelled", "expired", "incomplete"}
        )
        assert resumed.status == "completed", resumed.last_error
        assert resumed.started_at == started.started_at
        messages = sdk.beta.threads.messages.list(thread.id, order="asc").data
        assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]  # no duplicate answer
        assert messages[1].status == "completed" and messages[1].content[0].text.value == "You said: first"  # type: ignore[union-attr]
        assert len(messages[3].content[0].text.value.split()) == 100  # type: ignore[union-attr]
        assert resumed.usage is not None and resumed.usage.completion_tokens == 100
        steps = sdk.beta.threads.runs.steps.list(interrupted.id, thread_id=thread.id).data
        assert [(s.type, s.status) for s in steps] == [("message_creation", "completed")]


def assert_one_line_failure(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """A start-up failure: non-zero, one line on stderr naming the problem,
    no traceback, and never after the server said it was serving."""
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "serving the Assistants API" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("routing", "fragments"),
    [
        ("model_list: [\n  - model_name: x\n  bad", ["models.yaml", "malformed YAML at line 2, column 3"]),
        ("model_list: []\nrouter_settings: {}\n", ["unknown key 'router_settings' at the top level"]),
        (
            "model_list:\n  - model_name: gpt-4o\n    litellm_params: {model: offline/x}\n    modelinfo: {}\n",
            ["unknown key 'modelinfo' in model_list[0]"],
        ),
        ("model_list:\n  - model_name: gpt-4o\n", ["model_list[0]: litellm_params.model (a string) is required"]),
    ],
    ids=["malformed-yaml", "unknown-top-level-key", "unknown-entry-key", "entry-without-model"],
)
def test_bad_routing_file_is_one_line(tmp_path: Path, routing: str, fragments: list[str]) -> None:
    (tmp_path / "models.yaml").write_text(routing)
    result = run_cli("serve", "--port", str(free_port()), "--config", "models.yaml", cwd=tmp_path)
    assert_one_line_failure(result, *fragments)
    assert not (tmp_path / "data").exists(), "nothing may be created before the configuration is known good"


@pytest.mark.parametrize(
    ("command", "url", "fragments"),
    [
        (
            "serve",
            "postgresql://user:secret@127.0.0.1:5432/db",
            ["write postgresql+asyncpg:// instead of postgresql://"],
        ),
        ("serve", "postgres://user:secret@127.0.0.1/db", ["write postgresql+asyncpg:// instead of postgres://"]),
        ("serve", "sqlite:///assistants.db", ["write sqlite+aiosqlite:// instead of sqlite://"]),
        ("serve", "mysql://user@127.0.0.1/db", ["unsupported database 'mysql'"]),
        (
            "serve",
            "postgresql+asyncpg://user:secret@127.0.0.1/db?statement_cache_size=off",
            ["the database URL's statement_cache_size must be a whole number ≥ 0, not 'off'"],
        ),
        (
            "serve",
            "postgresql+asyncpg://user:secret@127.0.0.1/db?command_timeout=-5",
            ["the database URL's command_timeout must be a number of seconds > 0, not '-5'"],
        ),
        (
            "serve",
            "postgresql+asyncpg://user:secret@127.0.0.1/db?command_timeout=0",
            ["the database URL's command_timeout must be a number of seconds > 0, not '0'"],
        ),
        # The other commands share the check: one case each.
        ("migrate", "sqlite:///assistants.db", ["write sqlite+aiosqlite:// instead of sqlite://"]),
        ("worker", "postgresql://user:secret@127.0.0.1:5432/db", ["write postgresql+asyncpg://"]),
    ],
    ids=[
        "serve-postgresql-without-asyncpg",
        "serve-postgres-scheme",
        "serve-sqlite-without-aiosqlite",
        "serve-mysql",
        "serve-postgresql-cache-size-not-a-number",
        "serve-postgresql-negative-command-timeout",
        "serve-postgresql-zero-command-timeout",
        "migrate-sqlite-without-aiosqlite",
        "worker-postgresql-without-asyncpg",
    ],
)
def test_database_url_without_the_async_driver_says_what_to_write(
    tmp_path: Path, command: str, url: str, fragments: list[str]
) -> None:
    result = run_cli(command, "--port", str(free_port()), "--database-url", url, cwd=tmp_path)
    assert_one_line_failure(result, *fragments)
    assert "secret" not in result.stderr
    assert not (tmp_path / "assistants.db").exists()


def test_unreachable_postgresql_names_host_and_port(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there once the probe is closed
    url = f"postgresql+asyncpg://user:secret@127.0.0.1:{closed}/db"
    for command in ("serve", "worker"):  # migrate runs the same check as serve
        result = run_cli(command, "--port", str(free_port()), "--database-url", url, cwd=tmp_path)
        assert_one_line_failure(result, f"cannot reach PostgreSQL at 127.0.0.1:{closed}", "connection refused")
        assert "secret" not in result.stderr


def test_port_in_use_is_refused_before_the_database_is_touched(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--port", str(port), cwd=tmp_path)
    assert_one_line_failure(result, f"port {port} on 127.0.0.1 is already in use")
    assert not (tmp_path / "data").exists(), "the database must not be created (nor migrated) first"


def test_version_and_sandbox_setup_help() -> None:
    import app

    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"assistants-server {app.__version__}"
    setup = run_cli("sandbox-setup", "--help")
    assert setup.returncode == 0 and "--path" in setup.stdout and "--base-python" in setup.stdout


def test_auto_runs_on_uvloop_when_installed_as_root_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Root used to keep asyncio (its subprocesses took the sandbox's
    user/group arguments); sessions now switch users with setpriv."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    auto = Settings(event_loop="auto")
    assert auto.resolved_event_loop() == "uvloop" and loop_factory(auto) is uvloop.new_event_loop
    chosen = Settings(event_loop="asyncio")
    assert chosen.resolved_event_loop() == "asyncio" and loop_factory(chosen) is None
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "uvloop" else find_spec(name))
    assert auto.resolved_event_loop() == "asyncio"


def test_default_paths_do_not_depend_on_the_working_directory(tmp_path: Path) -> None:
    # ./data is documented as relative; everything else resolves the same anywhere.
    probe = "from app.settings import Settings; s = Settings(); print(s.sandbox_python, s.sandbox_python.is_absolute())"
    seen = set()
    for cwd in (REPO_ROOT, tmp_path):
        done = subprocess.run(
            [sys.executable, "-c", probe], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        seen.add(done.stdout.strip())
    (only,) = seen
    assert only.endswith(" True") and str(Path(sys.prefix)) in only


def test_start_up_objects_are_frozen_and_the_youngest_generation_collected_less_often() -> None:
    """freeze_start_up_objects (issue 17): start-up's objects out of every
    later collection, the youngest generation's threshold raised."""
    import gc

    from app.__main__ import YOUNGEST_GENERATION_THRESHOLD, freeze_start_up_objects

    threshold = gc.get_threshold()
    try:
        freeze_start_up_objects()
        assert gc.get_freeze_count() > 0 and gc.get_threshold()[0] == YOUNGEST_GENERATION_THRESHOLD
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
