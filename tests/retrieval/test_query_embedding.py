"""A search's query vectors start before its transaction opens: an embedder
of this process runs beside the keyword query (two cores; the search's
transaction is read-only, so on SQLite it holds no write lock meanwhile), a
provider's is awaited first, so that no transaction waits on a network call."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from app.retrieval import embed
from app.settings import Settings

# Not connected to: only its kind matters here.
POSTGRES = "postgresql+asyncpg://postgres@/unused"


def _settings(tmp_path: Path, routing: str, database_url: str = POSTGRES) -> Settings:
    config = tmp_path / "models.yaml"
    config.write_text(routing)
    return Settings(data_dir=tmp_path / "data", llm_config=config, database_url=database_url)


@pytest.mark.parametrize("url", [POSTGRES, ""], ids=["postgres", "sqlite"])
async def test_an_in_process_embedder_is_still_running_when_the_search_starts(tmp_path: Path, url: str) -> None:
    settings = _settings(tmp_path, "embedding_model: hashing\n", url)
    pending = await embed.start_query_embedding(settings, ["zebras in the savanna"])
    assert not pending.done()  # the caller's keyword query runs meanwhile
    assert await pending == await embed.embed_queries(settings, ["zebras in the savanna"])


async def test_a_provider_embedder_has_answered_before_the_search_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(
        tmp_path,
        "embedding_model: emb\n"
        "model_list:\n"
        "  - model_name: emb\n"
        "    litellm_params: {model: openai/text-embedding-3-small, api_base: 'http://127.0.0.1:9/v1'}\n",
    )

    async def provider(_self: embed.LiteLLMEmbedder, texts: Sequence[str]) -> list[list[float]]:
        return [[1.0, 0.0] for _ in texts]

    monkeypatch.setattr(embed.LiteLLMEmbedder, "embed", provider)
    ready = await embed.start_query_embedding(settings, ["zebras"])
    assert ready.done() and ready.result() == [[1.0, 0.0]]


async def test_keyword_only_needs_no_vectors(tmp_path: Path) -> None:
    pending = await embed.start_query_embedding(_settings(tmp_path, "embedding_model: none\n"), ["zebras"])
    assert await pending is None
