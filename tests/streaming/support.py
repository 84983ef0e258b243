"""Helpers shared by the streaming tests."""

from __future__ import annotations

import time
from typing import Any

import httpx2
import openai
from openai.types.beta.threads import Run

from tests.streaming import rules

FINAL = {"requires_action", "completed", "incomplete", "failed", "cancelled", "expired"}


def stream(raw: httpx2.Client, path: str, body: dict[str, Any]) -> tuple[httpx2.Response, list[rules.SSE], int]:
    """POST with ``"stream": true``; the response, its checked events and its keep-alive count."""
    with raw.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        events, keepalives = rules.read(response.iter_raw())
    return response, events, keepalives


def poll_run(sdk: openai.OpenAI, thread_id: str, run_id: str, timeout: float = 20.0) -> Run:
    """The run once it stopped (bounded wait; never a bare sleep for work)."""
    deadline = time.monotonic() + timeout
    while True:
        run = sdk.beta.threads.runs.retrieve(run_id, thread_id=thread_id)
        if run.status in FINAL:
            return run
        assert time.monotonic() < deadline, f"run {run_id} still {run.status}"
        time.sleep(0.02)


def of(events: list[rules.SSE], name: str) -> list[Any]:
    return [event.data for event in events if event.event == name]


def thread_with(sdk: openai.OpenAI, text: str) -> str:
    return sdk.beta.threads.create(messages=[{"role": "user", "content": text}]).id
