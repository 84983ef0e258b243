"""What the operator's endpoints and the per-request observation cost.

* the request middleware (request id, access-log decision, HTTP metrics):
  in-process, around a trivial ASGI app, with and without it;
* ``/healthz``, ``/readyz`` and ``/metrics`` round trips against the real
  server (``python -m app serve`` on SQLite, a subprocess on a free port),
  after a few runs so the registry has series to render.

Prints a markdown table; writes nothing outside a temporary directory.

    .venv/bin/python bench/operations.py
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2
from fastapi import FastAPI

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.observability.http import RequestObserver  # noqa: E402
from app.observability.metrics import Metrics  # noqa: E402


async def _bare(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def middleware_cost(requests: int = 20_000) -> tuple[float, float]:
    """Microseconds per request: bare app, then wrapped (with a runtime's metrics)."""
    holder = FastAPI()
    holder.state.runtime = type("R", (), {"metrics": Metrics()})()
    scope = {"type": "http", "method": "GET", "path": "/v1/assistants", "query_string": b"", "app": holder}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    async def send(_message: Any) -> None:
        return None

    results = []
    for app in (_bare, RequestObserver(_bare)):
        started = time.perf_counter()
        for _ in range(requests):
            await app(dict(scope), receive, send)
        results.append((time.perf_counter() - started) / requests * 1e6)
    return results[0], results[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def endpoint_latencies(rounds: int = 300) -> dict[str, float]:
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": str(REPO)}
        command = [
            sys.executable,
            "-m",
            "app",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            data,
            "--log-level",
            "warning",
        ]
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            with httpx2.Client(base_url=base, timeout=10) as client:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        client.get("/healthz")
                        break
                    except httpx2.TransportError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
                headers = {"OpenAI-Beta": "assistants=v2"}
                assistant = client.post("/v1/assistants", json={"model": "gpt-4o"}, headers=headers).json()
                for _ in range(20):
                    body = {"assistant_id": assistant["id"], "thread": {"messages": [{"role": "user", "content": "x"}]}}
                    client.post("/v1/threads/runs", json=body, headers=headers)
                while client.get("/readyz").json()["worker"]["runs_executing"] or (
                    "assistants_runs_queued 0.0" not in client.get("/metrics").text
                ):
                    time.sleep(0.05)  # let the runs finish: measure the endpoints alone
                p50 = {}
                for path in ("/healthz", "/readyz", "/metrics", f"/v1/assistants/{assistant['id']}"):
                    timings = []
                    for _ in range(rounds):
                        started = time.perf_counter()
                        client.get(path, headers=headers)
                        timings.append((time.perf_counter() - started) * 1000)
                    p50[path] = statistics.median(timings)
                return p50
        finally:
            server.terminate()
            server.wait(timeout=20)


def main() -> None:
    bare, observed = asyncio.run(middleware_cost())
    print(f"| request middleware | {bare:.1f} µs bare app | {observed:.1f} µs observed | +{observed - bare:.1f} µs |")
    for path, median in endpoint_latencies().items():
        print(f"| GET {path} | p50 {median:.2f} ms |")


if __name__ == "__main__":
    main()
