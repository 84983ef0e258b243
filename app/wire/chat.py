"""Chat completions on the wire (``POST /chat/completions``), named like the
SDK's types. The request keeps messages and tools as the JSON they are: they
go to the model as sent (the provider, or the offline model, reads them).
Responses are built as TypedDicts and checked against OpenAI's schemas in
the tests (tests/openapi)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypedDict

from pydantic import ConfigDict, Field

from app.wire import common
from app.wire.common import RequestModel

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class ChatMessageParam(RequestModel):
    """One input message; role-specific fields are checked loosely, as the model reads them."""

    model_config = ConfigDict(extra="allow")
    role: Role
    content: str | list[dict[str, Any]] | None = None


class FunctionDefinition(RequestModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


# The same three formats as runs, without runs' "auto".
ResponseFormat = Annotated[
    common.ResponseFormatText | common.ResponseFormatJsonObject | common.ResponseFormatJsonSchema,
    Field(discriminator="type"),
]


class StreamOptions(RequestModel):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class ChatCompletionCreate(RequestModel):
    """The parameters OpenAI accepts; unknown ones are a 400, as there."""

    model: str | None = None  # Azure's deployment path names the model instead
    messages: list[ChatMessageParam] = Field(min_length=1)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    # Passed to a provider as they are (the offline model ignores them).
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, int] | None = None
    user: str | None = None
    # Accepted and not acted on (no stored completions, no logprobs, one tier).
    store: bool | None = None
    metadata: dict[str, str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    verbosity: str | None = None
    # The deprecated function-calling parameters: refused with a clear message.
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None


# ----------------------------------------------------------------- responses


class FunctionCall(TypedDict):
    name: str
    arguments: str


class ToolCall(TypedDict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class _AssistantMessage(TypedDict):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None
    annotations: list[Any]


class AssistantMessage(_AssistantMessage, total=False):
    tool_calls: list[ToolCall]


class Choice(TypedDict):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: FinishReason


class CompletionUsage(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    system_fingerprint: str
    service_tier: Literal["default"]


class ChunkChoice(TypedDict):
    index: int
    delta: dict[str, Any]  # role / content / tool_calls pieces, as they come
    logprobs: None
    finish_reason: FinishReason | None


class _ChatCompletionChunk(TypedDict):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    system_fingerprint: str
    service_tier: Literal["default"]


class ChatCompletionChunk(_ChatCompletionChunk, total=False):
    usage: CompletionUsage | None
