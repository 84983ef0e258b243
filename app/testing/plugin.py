"""The pytest plugin: an Assistants API server for the tests of a project.

Loaded automatically wherever the ``assistants-server`` package is installed
(the ``pytest11`` entry point). Fixtures:

- ``assistants_server`` (session): starts ``assistants-server serve
  --ephemeral`` once (a free port, a temporary data directory, SQLite, the
  offline model) and yields an ``AssistantsServer``: ``base_url``,
  ``api_key``, ``openai_client()``, ``script(...)``, ``model_requests(...)``.
- ``assistants`` (function): the same server, reset before the test (each
  test sees only what it created), with ``OPENAI_BASE_URL`` and
  ``OPENAI_API_KEY`` set for the test, so code that builds ``OpenAI()`` from
  the environment talks to it unchanged.

Options: ``--assistants-server-url URL`` (with ``--assistants-server-key``)
uses a running server instead; ``--assistants-server-config PATH`` gives the
ephemeral server a model routing file; ``--llm-record DIR`` / ``--llm-replay
DIR`` record real models' answers and replay them offline (a test whose runs
asked for an answer that was never recorded fails, naming the difference).
When a test fails, the server's log lines from that test are added to its report.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from app.testing.client import AdminError, AssistantsServer
from app.testing.server import ServerProcess

_LOG_OFFSET = pytest.StashKey[int]()
_PROCESS = pytest.StashKey[ServerProcess | None]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("assistants-server", "Assistants API server for tests")
    group.addoption(
        "--assistants-server-url",
        default=os.environ.get("ASSISTANTS_SERVER_URL"),
        help="use this running server (its /v1 base URL) instead of starting one",
    )
    group.addoption(
        "--assistants-server-key",
        default=os.environ.get("ASSISTANTS_SERVER_KEY", "sk-assistants-server-test"),
        help="API key for --assistants-server-url",
    )
    group.addoption("--assistants-server-config", help="model routing file for the server the tests start")
    group.addoption("--llm-record", metavar="DIR", help="record real models' answers into DIR (cassettes)")
    group.addoption("--llm-replay", metavar="DIR", help="answer from the cassettes in DIR, offline")


def _server_env(config: pytest.Config) -> dict[str, str]:
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    routing = config.getoption("assistants_server_config")
    if routing:
        env["ASSISTANTS_LLM_CONFIG"] = str(Path(routing).resolve())
    for option, variable in (("llm_record", "ASSISTANTS_LLM_RECORD"), ("llm_replay", "ASSISTANTS_LLM_REPLAY")):
        value = config.getoption(option)
        if value:
            env[variable] = str(Path(value).resolve())
    return env


def _external(url: str, key: str) -> AssistantsServer:
    parts = urlsplit(url)
    server = AssistantsServer(url.rstrip("/"), key, f"{parts.scheme}://{parts.netloc}/admin")
    try:
        server.rules()
    except (AdminError, OSError):
        server.admin_url = None  # a server without the admin API: no reset, no scripting
    return server


@pytest.fixture(scope="session")
def assistants_server(pytestconfig: pytest.Config) -> Iterator[AssistantsServer]:
    url = pytestconfig.getoption("assistants_server_url")
    if url:
        pytestconfig.stash[_PROCESS] = None
        yield _external(url, pytestconfig.getoption("assistants_server_key"))
        return
    process = ServerProcess.start(env=_server_env(pytestconfig))
    pytestconfig.stash[_PROCESS] = process
    try:
        yield AssistantsServer(process.base_url, process.api_key, process.admin_url)
    finally:
        pytestconfig.stash[_PROCESS] = None
        process.stop()


@pytest.fixture
def assistants(
    assistants_server: AssistantsServer, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[AssistantsServer]:
    if assistants_server.admin_url is not None:
        assistants_server.reset()
    monkeypatch.setenv("OPENAI_BASE_URL", assistants_server.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", assistants_server.api_key)
    yield assistants_server
    if assistants_server.admin_url is not None:
        misses = assistants_server.replay_misses()
        if misses:
            pytest.fail(
                "the model was asked for answers that were never recorded:\n" + "\n".join(misses), pytrace=False
            )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    process = item.config.stash.get(_PROCESS, None)
    if process is not None:
        item.stash[_LOG_OFFSET] = process.log_size()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and "assistants_server" in getattr(item, "fixturenames", ()):
        process = item.config.stash.get(_PROCESS, None)
        log = process.log_since(item.stash.get(_LOG_OFFSET, 0)).strip() if process is not None else ""
        if log:
            report.sections.append((f"assistants-server log ({report.when})", log))
    return report
