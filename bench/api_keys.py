"""What projects cost a request (issue 15): the key ring's lookup, cached and
not, and a small authenticated GET end to end (in-process, SQLite), with a
key from ASSISTANTS_API_KEYS, a stored key (cached), a stored key read on
every request (cache 0 s) and an open server.

    .venv/bin/python bench/api_keys.py [--requests 400]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx2

from app.main import create_app
from app.services import api_keys
from app.settings import Settings

ENV_KEY = "sk-bench-env"


def _micros(samples: list[float]) -> str:
    ordered = sorted(samples)
    return f"median {statistics.median(ordered) * 1e6:7.1f} us, p95 {ordered[int(len(ordered) * 0.95)] * 1e6:7.1f} us"


async def _ring(settings: Settings, rounds: int) -> None:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        runtime = application.state.runtime
        async with runtime.transaction() as session:
            key, _ = await api_keys.create(session, "bench")
        cached = api_keys.KeyRing(runtime.engine, [ENV_KEY], ttl=60.0)
        uncached = api_keys.KeyRing(runtime.engine, [ENV_KEY], ttl=0.0)
        for label, ring, value in (
            ("configured key", cached, ENV_KEY),
            ("stored key, cached", cached, key),
            ("stored key, read (cache 0 s)", uncached, key),
        ):
            samples = []
            for _ in range(rounds):
                started = time.perf_counter()
                await ring.project_of(value)
                samples.append(time.perf_counter() - started)
            print(f"KeyRing.project_of, {label:<30} {_micros(samples)}")


async def _stored_key(settings: Settings) -> str:
    # Made before the measured server starts (a server that started open
    # notices a first key within its cache time).
    application = create_app(settings)
    async with application.router.lifespan_context(application), application.state.runtime.transaction() as session:
        key, _ = await api_keys.create(session, "bench")
    return key


async def _requests(settings: Settings, label: str, stored: bool, count: int) -> None:
    key = await _stored_key(settings) if stored else ENV_KEY
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        headers = {"Authorization": f"Bearer {key}", "OpenAI-Beta": "assistants=v2"}
        transport = httpx2.ASGITransport(app=application)
        async with httpx2.AsyncClient(transport=transport, base_url="http://bench") as http:
            for _ in range(20):
                (await http.get("/v1/assistants?limit=1", headers=headers)).raise_for_status()
            samples = []
            for _ in range(count):
                started = time.perf_counter()
                (await http.get("/v1/assistants?limit=1", headers=headers)).raise_for_status()
                samples.append(time.perf_counter() - started)
    print(f"GET /v1/assistants, {label:<36} {_micros(samples)}")


async def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        base = Settings(data_dir=Path(scratch) / "data", embedded_worker=False)
        await _ring(base, count)
        await _requests(base.model_copy(update={"api_keys": [ENV_KEY]}), "ASSISTANTS_API_KEYS key", False, count)
        await _requests(base, "stored key (cached 10 s)", True, count)
        await _requests(base.model_copy(update={"key_cache_seconds": 0.0}), "stored key, read every time", True, count)
    with tempfile.TemporaryDirectory() as scratch:
        await _requests(Settings(data_dir=Path(scratch) / "data", embedded_worker=False), "open server", False, count)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400)
    asyncio.run(main(parser.parse_args().requests))
