"""A live server on a loopback socket for the streaming tests (httpx's
ASGITransport buffers whole responses, so SSE needs a real socket).

One uvicorn server per database runs in a background thread for the whole
session; tests share it and stay apart by creating their own assistants and
threads. Clients are the official SDK (sync and async) and a raw HTTP client
for byte-level checks. Errors the server logs fail the test that was running.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import openai
import pytest
import uvicorn

from app.main import create_app
from app.settings import Settings
from tests import pg

DATABASES = ["sqlite", "postgres"]
# Short keep-alives, so a test sees them between slow tokens (a Settings field
# the server reads once it has one; ignored until then).
KEEPALIVE_SECONDS = 0.25
START_TIMEOUT = 60.0


class _ErrorLog(logging.Handler):
    """Collects what the server logs at ERROR or above."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class LiveServer:
    settings: Settings
    port: int = 0
    errors: _ErrorLog = field(default_factory=_ErrorLog)
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        # The event loop `serve` would pick: uvloop when installed, root or not.
        loop = self.settings.resolved_event_loop()
        config = uvicorn.Config(
            create_app(self.settings), lifespan="on", log_config=None, timeout_graceful_shutdown=2, loop=loop
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        for name in ("app", "uvicorn.error", "sse_starlette"):
            logging.getLogger(name).addHandler(self.errors)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started:
            assert self._thread.is_alive(), "the live server failed to start"
            assert time.monotonic() < deadline, "the live server did not start in time"
            time.sleep(0.02)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=30)
        for name in ("app", "uvicorn.error", "sse_starlette"):
            logging.getLogger(name).removeHandler(self.errors)


@pytest.fixture(scope="session", params=DATABASES)
def live(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp(f"live-{request.param}")
    database_url = f"sqlite+aiosqlite:///{data_dir / 'live.db'}"
    database = None
    if request.param == "postgres":
        postgres: pg.EmbeddedPostgres = request.getfixturevalue("postgres")
        database = "live_" + secrets.token_hex(6)
        postgres.create_database(database)
        database_url = postgres.url(database)
    settings = Settings(
        data_dir=Path(data_dir),
        database_url=database_url,
        poll_after_ms=10,
        stream_keepalive_seconds=KEEPALIVE_SECONDS,
    )
    server = LiveServer(settings)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if database is not None:
            postgres.drop_database(database)


@pytest.fixture(autouse=True)
def _server_logs_no_error(request: pytest.FixtureRequest) -> Iterator[None]:
    if "live" not in request.fixturenames:
        yield
        return
    server: LiveServer = request.getfixturevalue("live")
    seen = len(server.errors.records)
    yield
    logged = [record.getMessage() for record in server.errors.records[seen:]]
    assert not logged, f"the server logged errors: {logged}"


@pytest.fixture
def sdk(live: LiveServer) -> Iterator[openai.OpenAI]:
    """The official SDK, synchronous, as most users stream."""
    with openai.OpenAI(base_url=live.base_url, api_key="sk-test", max_retries=0, timeout=30) as client:
        yield client


@pytest.fixture
async def async_sdk(live: LiveServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=live.base_url, api_key="sk-test", max_retries=0, timeout=30) as client:
        yield client


@pytest.fixture
def raw(live: LiveServer) -> Iterator[httpx2.Client]:
    """Plain HTTP, for what the SDK hides: bytes, headers, status codes."""
    headers = {"OpenAI-Beta": "assistants=v2", "Authorization": "Bearer sk-test"}
    with httpx2.Client(base_url=live.base_url, headers=headers, timeout=30) as client:
        yield client


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture
def assistant_id(sdk: openai.OpenAI) -> str:
    """An assistant offering the weather function (the offline model answers)."""
    return sdk.beta.assistants.create(model="gpt-4o", name="Streamer", tools=[WEATHER]).id  # type: ignore[list-item]
