"""Fixtures of the run engine's tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import uvloop

from app.llm import LLM
from app.runtime import Runtime
from app.settings import Settings

# The loops a test here may run on: asyncio's, the tests' own, and uvloop,
# the server's (settings.event_loop). A test marked
# ``pytest.mark.asyncio(loop_factories=list(LOOPS))`` runs on each, its
# fixtures (the runtime, its engine) on the same loop; the others run on
# asyncio's alone, under their usual ids.
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """pytest-asyncio's hook: a test not naming loops (most) gets one,
    asyncio's, so it runs once, as without the hook; one naming loops gets
    those it names."""
    marker = item.get_closest_marker("asyncio")
    named = marker.kwargs.get("loop_factories", ()) if marker is not None else ()
    return {name: LOOPS[name] for name in ("asyncio", *named)}


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
