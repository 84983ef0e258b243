"""Fixtures of the run engine's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from app.llm import LLM
from app.runtime import Runtime
from app.settings import Settings


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """A started runtime (engine, bus, run log) without a worker: each test
    runs the worker it needs."""
    rt = await Runtime.start(settings)
    try:
        yield rt
    finally:
        await rt.close()


@pytest.fixture
async def llms() -> AsyncIterator[list[LLM]]:
    """LLMs a test makes; their connection pools are closed after it."""
    made: list[LLM] = []
    try:
        yield made
    finally:
        for llm in made:
            await llm.aclose()
