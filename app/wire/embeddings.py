"""Embeddings on the wire (``POST /embeddings``)."""

from __future__ import annotations

from typing import Literal, TypedDict

from pydantic import Field

from app.wire.common import RequestModel

# OpenAI's limit on inputs per request.
MAX_INPUTS = 2048


class EmbeddingCreate(RequestModel):
    model: str | None = None  # Azure's deployment path names the model instead
    # A string, strings, token ids, or lists of token ids (LangChain sends tokens).
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


class Embedding(TypedDict):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # base64 of little-endian float32 with encoding_format=base64


class EmbeddingUsage(TypedDict):
    prompt_tokens: int
    total_tokens: int


class CreateEmbeddingResponse(TypedDict):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
