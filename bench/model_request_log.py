"""The model-request log's cost per run: sequential thread-and-run + poll
with the offline model, in-process on SQLite, with
ASSISTANTS_RECORD_MODEL_REQUESTS on and off, in alternating rounds.

    LITELLM_LOCAL_MODEL_COST_MAP=True .venv/bin/python -W ignore bench/model_request_log.py
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx2
import openai

from app.main import create_app
from app.settings import Settings

RUNS_PER_ROUND = 150
ROUNDS = 3


async def measure(record: bool) -> list[float]:
    """Milliseconds per run, create to completed as the SDK's poller sees it."""
    with tempfile.TemporaryDirectory() as data:
        app = create_app(Settings(data_dir=Path(data), poll_after_ms=5, record_model_requests=record))
        client = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://t")
        async with app.router.lifespan_context(app), client as http:
            sdk = openai.AsyncOpenAI(base_url="http://t/v1", api_key="x", http_client=http)
            assistant = await sdk.beta.assistants.create(model="m")
            thread = {"messages": [{"role": "user", "content": "hi"}]}
            times = []
            for _ in range(RUNS_PER_ROUND):
                started = time.perf_counter()
                await sdk.beta.threads.create_and_run_poll(
                    assistant_id=assistant.id,
                    thread=thread,
                    poll_interval_ms=5,  # type: ignore[arg-type]
                )
                times.append((time.perf_counter() - started) * 1000)
            return times


async def main() -> None:
    for round_number in range(ROUNDS):
        for record in (False, True):
            times = await measure(record)
            print(
                f"round {round_number} record={record}: "
                f"p50 {statistics.median(times):.1f} ms, mean {statistics.mean(times):.1f} ms"
            )


if __name__ == "__main__":
    asyncio.run(main())
