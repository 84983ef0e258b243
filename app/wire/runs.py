"""Runs and run steps (openai.types.beta.threads.Run, ...runs.RunStep)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from app.wire.assistants import ReasoningEffort
from app.wire.common import (
    MAX_STORED_INT,
    MAX_TEXT,
    Metadata,
    ModelName,
    RequestModel,
    ResponseFormat,
    Tool,
    ToolResources,
    WireModel,
)
from app.wire.messages import MessageCreate
from app.wire.threads import ThreadCreate

FILE_SEARCH_CONTENT_INCLUDE = "step_details.tool_calls[*].file_search.results[*].content"

RunStatus = Literal[
    "queued",
    "in_progress",
    "requires_action",
    "cancelling",
    "cancelled",
    "failed",
    "completed",
    "incomplete",
    "expired",
]


class TruncationStrategy(RequestModel):
    type: Literal["auto", "last_messages"]
    last_messages: int | None = Field(default=None, ge=1)


class NamedFunction(RequestModel):
    name: str


class FunctionChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


class CodeInterpreterChoice(RequestModel):
    type: Literal["code_interpreter"]


class FileSearchChoice(RequestModel):
    type: Literal["file_search"]


ToolChoice = (
    Literal["none", "auto", "required"]
    | Annotated[FunctionChoice | CodeInterpreterChoice | FileSearchChoice, Field(discriminator="type")]
)


class _RunOptions(RequestModel):
    """Fields shared by create run and create thread-and-run."""

    assistant_id: str
    model: ModelName | None = None
    reasoning_effort: ReasoningEffort | None = None
    instructions: str | None = Field(default=None, max_length=MAX_TEXT)
    tools: list[Tool] | None = Field(default=None, max_length=20)
    metadata: Metadata | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stream: bool | None = None
    max_prompt_tokens: int | None = Field(default=None, ge=256, le=MAX_STORED_INT)
    max_completion_tokens: int | None = Field(default=None, ge=256, le=MAX_STORED_INT)
    truncation_strategy: TruncationStrategy | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


class RunCreate(_RunOptions):
    additional_instructions: str | None = Field(default=None, max_length=MAX_TEXT)
    additional_messages: list[MessageCreate] | None = None


class ThreadAndRunCreate(_RunOptions):
    thread: ThreadCreate | None = None
    tool_resources: ToolResources | None = None


class RunUpdate(RequestModel):
    metadata: Metadata | None = None


class ToolOutput(RequestModel):
    tool_call_id: str
    # go-openai types output as `any`: non-string JSON is accepted and serialized.
    output: Any = None


class SubmitToolOutputs(RequestModel):
    tool_outputs: list[ToolOutput]
    stream: bool | None = None


class Run(WireModel):
    id: str
    object: Literal["thread.run"] = "thread.run"
    created_at: int
    thread_id: str
    assistant_id: str
    status: RunStatus
    required_action: dict[str, Any] | None
    last_error: dict[str, Any] | None
    expires_at: int | None
    started_at: int | None
    cancelled_at: int | None
    failed_at: int | None
    completed_at: int | None
    incomplete_details: dict[str, Any] | None
    model: str
    instructions: str
    tools: list[dict[str, Any]]
    metadata: dict[str, str]
    usage: dict[str, int] | None
    temperature: float | None
    top_p: float | None
    max_prompt_tokens: int | None
    max_completion_tokens: int | None
    truncation_strategy: dict[str, Any] | None
    tool_choice: Any
    parallel_tool_calls: bool
    response_format: Any


class RunStep(WireModel):
    id: str
    object: Literal["thread.run.step"] = "thread.run.step"
    created_at: int
    assistant_id: str
    thread_id: str
    run_id: str
    type: Literal["message_creation", "tool_calls"]
    status: Literal["in_progress", "cancelled", "failed", "completed", "expired"]
    step_details: dict[str, Any]
    last_error: dict[str, Any] | None
    expired_at: int | None
    cancelled_at: int | None
    failed_at: int | None
    completed_at: int | None
    metadata: dict[str, str] | None
    usage: dict[str, int] | None
