"""Embeddings (``POST /embeddings``, issue 12) with the embedders the server
already has (app/retrieval/embed.py): the routing file's ``embedding_model``,
any routed provider model through litellm, the local all-MiniLM-L6-v2, or the
built-in hashing embedder, which also serves every name routed to the
offline model, so embeddings work with nothing configured."""

from __future__ import annotations

import asyncio
import base64
import math
import struct

from app import errors, llm
from app.retrieval import embed
from app.services.chat import model_not_found
from app.settings import Settings
from app.wire import embeddings as wire


def _embedder(settings: Settings, models: llm.LLM, model: str) -> embed.Embedder:
    configured = embed.embedder(settings)
    if configured is not None and configured.name == model:
        return configured
    if model == embed.HashingEmbedder.name:
        return embed.HashingEmbedder()
    from app.retrieval import minilm  # numpy and the weights only for a request that names the model

    if model.lower().removeprefix("local/") == minilm.MiniLM.name:
        try:
            return minilm.load()
        except ValueError as exc:  # the weights package is not installed
            raise errors.invalid(str(exc), param="model") from exc
    if not models.is_configured(model):
        raise model_not_found(model)
    route = models.route(model)
    if route.offline:
        return embed.HashingEmbedder()
    return embed.LiteLLMEmbedder(model, dict(route.params))


async def _texts(value: str | list[str] | list[int] | list[list[int]]) -> list[str]:
    """The inputs as text; token ids (LangChain sends them) are decoded, in a
    thread: the tokenizer's first use imports litellm, which takes seconds."""
    if isinstance(value, str):
        value = [value]
    if not value:
        raise errors.invalid("'$.input' is invalid. Please check the API reference.", param="input")
    if len(value) > wire.MAX_INPUTS:
        raise errors.invalid(f"'$.input' must have at most {wire.MAX_INPUTS} items.", param="input")
    texts = []
    for item in [value] if isinstance(value[0], int) else value:  # one input given as token ids
        text = item if isinstance(item, str) else await asyncio.to_thread(llm.decode_tokens, [int(t) for t in item])
        if not text:
            raise errors.invalid("'$.input' is invalid. Please check the API reference.", param="input")
        texts.append(text)
    return texts


def _shorten(vector: list[float], dimensions: int | None) -> list[float]:
    """The first ``dimensions`` values, normalised again (as OpenAI shortens v3 embeddings)."""
    if dimensions is None or dimensions == len(vector):
        return vector
    if dimensions > len(vector):
        raise errors.invalid(
            f"This model's embeddings have {len(vector)} dimensions: 'dimensions' must be at most that.",
            param="dimensions",
        )
    head = vector[:dimensions]
    norm = math.sqrt(sum(value * value for value in head)) or 1.0
    return [value / norm for value in head]


def _encoded(vector: list[float], encoding: str | None) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


async def create(
    settings: Settings, models: llm.LLM, body: wire.EmbeddingCreate, deployment: str | None = None
) -> wire.CreateEmbeddingResponse:
    model = deployment or body.model
    if not model:
        raise errors.invalid("you must provide a model parameter")
    embedder = _embedder(settings, models, model)
    texts = await _texts(body.input)
    try:
        vectors = await embedder.embed(texts)
    except errors.APIError:
        raise
    except Exception as exc:  # a provider's failure, reported rather than a bare 500
        raise errors.APIError(502, f"The embedding model '{model}' failed: {exc}", type="server_error") from exc
    tokens = sum(models.count_text_tokens(model, text) for text in texts)
    data: list[wire.Embedding] = [
        {
            "object": "embedding",
            "index": index,
            "embedding": _encoded(_shorten(vector, body.dimensions), body.encoding_format),
        }
        for index, vector in enumerate(vectors)
    ]
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
