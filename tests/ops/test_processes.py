"""The operator's view of real processes: `serve --log-format json` writes
nothing but JSON lines (uvicorn's included), and `worker --metrics-port`
serves /metrics and the probes beside the run executor."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from tests import pg
from tests.test_cli import START_TIMEOUT, STOP_TIMEOUT, clean_env, free_port, running_server


def test_serve_logs_json_lines_only(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(ASSISTANTS_API_KEYS="sk-json-0123456789")
    args = ["--port", str(port), "--log-format", "json", "--log-level", "debug"]
    with running_server(tmp_path, *args, port=port, env=env) as server:
        base = f"http://127.0.0.1:{port}"
        assert _poll(f"{base}/readyz", server.process, server.log_path)["status"] == "ready"
        assert httpx2.get(f"{base}/v1/assistants?api-key=sk-json-0123456789", timeout=5).status_code == 401
        sdk = server.sdk(api_key="sk-json-0123456789")
        assert sdk.beta.assistants.list().data == []
        assert server.terminate() == 0, server.log()
        log = server.log()
    assert "sk-json-0123456789" not in log
    entries = [json.loads(line) for line in log.splitlines() if line.strip()]
    loggers = {entry["logger"] for entry in entries}
    assert {"app", "app.access", "uvicorn.error"} <= loggers, loggers
    assert any("Application startup complete" in entry["message"] for entry in entries)
    readyz = next(entry for entry in entries if entry.get("http", {}).get("route") == "/readyz")
    assert readyz["level"] == "debug" and readyz["request_id"].startswith("req_")


@pytest.fixture(params=["sqlite", "postgres"])
def worker_args(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[list[str]]:
    if request.param == "sqlite":
        yield ["--data-dir", str(tmp_path / "data")]
        return
    server: pg.EmbeddedPostgres = request.getfixturevalue("postgres")
    name = "ops_" + secrets.token_hex(6)
    server.create_database(name)
    try:
        yield ["--database-url", server.url(name)]
    finally:
        server.drop_database(name)


def test_worker_serves_metrics_and_probes(tmp_path: Path, worker_args: list[str]) -> None:
    port = free_port()
    log_path = tmp_path / "worker.log"
    command = [sys.executable, "-m", "app", "worker", "--metrics-port", str(port), *worker_args]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, cwd=tmp_path, env=clean_env(), stdout=log_file, stderr=subprocess.STDOUT)
    try:
        ready = _poll(f"http://127.0.0.1:{port}/readyz", process, log_path)
        assert ready["status"] == "ready"
        assert ready["worker"]["in_process"] is True and ready["worker"]["ok"] is True
        metrics = httpx2.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "assistants_runs_queued 0.0" in metrics
        assert "assistants_sandbox_sessions 0.0" in metrics
        assert httpx2.get(f"http://127.0.0.1:{port}/v1/assistants", timeout=5).status_code == 404  # no API here
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STOP_TIMEOUT) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)


def _poll(url: str, process: subprocess.Popen[bytes], log_path: Path) -> dict[str, object]:
    """The first "ready" answer of ``url``, not the first answer: on a loaded
    machine one probe's SELECT 1 may miss its 2-s limit, a "not ready" that
    says nothing of the process. (An answer may take those 2 s: the client
    waits 5.)"""
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"process exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            response = httpx2.get(url, timeout=5.0)
        except httpx2.TransportError:
            time.sleep(0.05)
            continue
        body: dict[str, object] = response.json()
        if body.get("status") == "ready":
            return body
        last = response.text
        time.sleep(0.05)
    pytest.fail(f"process not ready after {START_TIMEOUT} s (last answer: {last}):\n{log_path.read_text()}")
