"""Logs: one format (text or JSON lines) carrying the request id and the run
id, failed runs logged once with their last_error, successful GETs below the
default level, API keys never written (headers, query strings, messages)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx2
import openai
import pytest
from fastapi import FastAPI

from app.llm import litellm_adapter
from app.main import create_app
from app.observability import logs
from app.settings import Settings

KEY = "sk-live-0123456789abcdef"


class Captured:
    def __init__(self) -> None:
        self.stream = io.StringIO()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines() if line.strip()]

    def text(self) -> str:
        return self.stream.getvalue()


@pytest.fixture
def captured() -> Iterator[Captured]:
    """Everything logged in the process at INFO (access lines at DEBUG), as the JSON format writes it."""
    capture = Captured()
    handler = logs.build_handler("json", [KEY], stream=capture.stream)
    root, access = logging.getLogger(), logging.getLogger("app.access")
    levels = root.level, access.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    access.setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        root.removeHandler(handler)
        root.setLevel(levels[0])
        access.setLevel(levels[1])


@pytest.fixture
async def keyed_app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings.model_copy(update={"api_keys": [KEY]}))
    async with application.router.lifespan_context(application):
        yield application


async def test_request_and_run_ids_on_every_line_and_failures_once(keyed_app: FastAPI, captured: Captured) -> None:
    transport = httpx2.ASGITransport(app=keyed_app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as http:
        sdk = openai.AsyncOpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0)
        assistant = await sdk.beta.assistants.create(model="gpt-4o")
        failed = await sdk.beta.threads.create_and_run_poll(
            assistant_id=assistant.id,
            thread={"messages": [{"role": "user", "content": "[[fail rate_limit]]"}]},
            poll_interval_ms=10,
        )
        assert failed.status == "failed" and failed.last_error is not None
        polled = await http.get(
            f"/v1/threads/{failed.thread_id}/runs/{failed.id}?api-version=2024-05-01&api-key={KEY}",
            headers={"OpenAI-Beta": "assistants=v2", "api-key": KEY},
        )
        assert polled.status_code == 200, polled.text
        refused = await http.get(
            "/v1/assistants?key=sk-wrong-but-secret", headers={"Authorization": "Bearer sk-nope-1"}
        )
        assert refused.status_code == 401

    lines = captured.lines()
    assert KEY not in captured.text()
    assert "sk-wrong-but-secret" not in captured.text() and "sk-nope-1" not in captured.text()

    access = [line for line in lines if line["logger"] == "app.access"]
    assert access and all(line["request_id"].startswith("req_") for line in access)
    poll = next(line for line in access if line["request_id"] == polled.headers["x-request-id"])
    assert poll["run_id"] == failed.id
    assert poll["level"] == "debug"  # a successful GET: below the default level
    assert poll["http"]["route"] == "/v1/threads/{thread_id}/runs/{run_id}"
    assert poll["http"]["path"].endswith("api-version=2024-05-01&api-key=[redacted]")
    rejected = next(line for line in access if line["http"]["status"] == 401)
    assert rejected["level"] == "info"
    assert rejected["http"]["path"] == "/v1/assistants?key=[redacted]"
    creation = next(line for line in access if line["http"]["method"] == "POST")
    assert creation["level"] == "info"

    failures = [line for line in lines if line["logger"] == "app.runs"]
    assert len(failures) == 1, failures
    assert failures[0]["run_id"] == failed.id and failures[0]["level"] == "warning"
    assert failures[0]["last_error"] == failed.last_error.model_dump()
    assert "rate_limit_exceeded" in failures[0]["message"]


def test_text_format_names_request_and_run() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("tests.ops.text")
    handler = logs.build_handler("text", [KEY], stream=stream)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        tokens = logs.bind_request("req_abc", {"path_params": {"run_id": "run_xyz"}})
        try:
            logger.warning("calling with Bearer %s and ?key=%s", KEY, "other-secret")
        finally:
            logs.unbind_request(tokens)
        logger.warning("outside any request")
    finally:
        logger.removeHandler(handler)
    first, second = stream.getvalue().splitlines()
    assert first.endswith(
        "WARNING tests.ops.text: calling with Bearer [redacted] and ?key=[redacted] request_id=req_abc run_id=run_xyz"
    )
    assert second.endswith("WARNING tests.ops.text: outside any request")


def test_json_lines_carry_exceptions_and_redact_them() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("tests.ops.json")
    handler = logs.build_handler("json", [KEY], stream=stream)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise RuntimeError(f"provider refused {KEY}")
        except RuntimeError:
            logger.exception("model call failed")
    finally:
        logger.removeHandler(handler)
    entry = json.loads(stream.getvalue())
    assert entry["level"] == "error" and entry["message"] == "model call failed"
    assert "RuntimeError: provider refused [redacted]" in entry["exception"]
    assert entry["time"].endswith("Z") and entry["request_id"] is None


def test_stored_keys_are_masked_but_their_prefix_stays() -> None:
    redact = logs.Redactor([])
    stored = "sk-proj-AbCd1234" + "x" * 40
    assert redact(f"refused {stored}.") == "refused sk-proj-AbCd1234[redacted]."


def test_litellm_lines_print_once(captured: Captured) -> None:
    litellm_adapter.load()  # imports litellm, which adds a handler of its own to its loggers
    for name in logs.LITELLM_LOGGERS:
        assert logging.getLogger(name).handlers == []
    logging.getLogger("LiteLLM").warning("provider hiccup")
    assert captured.text().count("provider hiccup") == 1
