"""Fixtures of the retrieval tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.runtime import Runtime
from app.settings import Settings


@pytest.fixture
async def runtime(database_url: str, tmp_path: Path) -> AsyncIterator[Runtime]:
    """A started runtime with the default settings (no worker running)."""
    started = await Runtime.start(Settings(data_dir=tmp_path / "data", database_url=database_url))
    try:
        yield started
    finally:
        await started.close()
