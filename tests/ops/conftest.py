"""Fixtures for the operator's endpoints: an HTTP client without the OpenAPI
response check (probes and metrics are not Assistants API shapes), the SDK
on the same app, and helpers to read /metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx2
import openai
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

BETA = {"OpenAI-Beta": "assistants=v2"}


@pytest.fixture
async def plain(app: FastAPI) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://testserver") as client:
        yield client


@pytest.fixture
def sdk(plain: httpx2.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="sk-test", http_client=plain, max_retries=0)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(client: httpx2.AsyncClient) -> Samples:
    """Every sample of /metrics, keyed by (name, labels)."""
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)
