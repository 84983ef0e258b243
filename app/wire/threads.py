"""Thread objects and request bodies (openai.types.beta.Thread)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from app.wire.common import Metadata, RequestModel, ToolResources, ToolResourcesUpdate, WireModel
from app.wire.messages import MessageCreate


class ThreadCreate(RequestModel):
    messages: list[MessageCreate] | None = Field(default=None, max_length=100000)
    tool_resources: ToolResources | None = None
    metadata: Metadata | None = None


class ThreadUpdate(RequestModel):
    # Modify takes vector store ids only: the vector_stores helper is create-only.
    tool_resources: ToolResourcesUpdate | None = None
    metadata: Metadata | None = None


class Thread(WireModel):
    id: str
    object: Literal["thread"] = "thread"
    created_at: int
    tool_resources: dict[str, Any] | None
    metadata: dict[str, str]
