"""Assistant objects and request bodies (openai.types.beta.Assistant)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from app.wire.common import (
    MAX_TEXT,
    Metadata,
    ModelName,
    RequestModel,
    ResponseFormat,
    Tool,
    ToolResources,
    ToolResourcesUpdate,
    WireModel,
)

ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class AssistantCreate(RequestModel):
    model: ModelName
    name: str | None = Field(default=None, max_length=256)
    description: str | None = Field(default=None, max_length=512)
    instructions: str | None = Field(default=None, max_length=MAX_TEXT)
    reasoning_effort: ReasoningEffort | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_resources: ToolResources | None = None
    metadata: Metadata | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    response_format: ResponseFormat | None = None


class AssistantUpdate(AssistantCreate):
    # go-openai sends "model": "" when the caller did not set it: "unchanged".
    model: str = Field(default="", max_length=256)
    # Modify takes no vector_stores helper (OAS ModifyAssistantRequest).
    tool_resources: ToolResourcesUpdate | None = None  # type: ignore[assignment]


class Assistant(WireModel):
    id: str
    object: Literal["assistant"] = "assistant"
    created_at: int
    name: str | None
    description: str | None
    model: str
    instructions: str | None
    tools: list[dict[str, Any]]
    tool_resources: dict[str, Any] | None
    metadata: dict[str, str]
    temperature: float | None
    top_p: float | None
    response_format: Any
