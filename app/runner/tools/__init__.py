"""Built-in tools (file_search, code_interpreter): the seam between the
executor and each tool's implementation.

The model sees a built-in tool as a function named after its type. When it
calls one, the executor (not the client) runs it: the call becomes a step
entry of the tool's own type (wire notes 2.6), its input and outputs are
streamed as step deltas, and the model is called again with the result. A
tool may also decorate the run's final message (citations, file links).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from app import orm

if TYPE_CHECKING:
    from app.runtime import Runtime

# Publishes one ToolCallDelta body (without "index"; the executor adds it).
PublishDelta = Callable[[dict[str, Any]], None]


@dataclass
class ToolResult:
    call: dict[str, Any]  # the finished step entry: {"id", "type", <type>: {...}}
    output: str  # what the model is told the tool returned
    # Content parts (e.g. image_file) the run's next message should carry.
    message_parts: list[dict[str, Any]] = field(default_factory=list)


class CallStream(Protocol):
    """Turns the model's argument fragments into step-delta bodies."""

    def first(self) -> dict[str, Any]: ...

    def feed(self, fragment: str) -> dict[str, Any] | None: ...


class BuiltinTool(Protocol):
    type: str

    def definition(self, run_tool: dict[str, Any]) -> dict[str, Any]:
        """The chat-completions function tool offered to the model."""
        ...

    def start_call(self, call_id: str) -> CallStream: ...

    async def execute(
        self, runtime: Runtime, run: orm.Run, call_id: str, arguments: str, publish: PublishDelta
    ) -> ToolResult: ...

    def decorate(
        self, runtime: Runtime, run: orm.Run, content: list[dict[str, Any]], results: list[ToolResult]
    ) -> list[dict[str, Any]]:
        """Final content of an assistant message, given this run's results of this tool."""
        ...


def chat_history(call: dict[str, Any], internal: dict[str, Any]) -> tuple[str, str]:
    """(arguments, output) of a finished built-in call as the model saw them."""
    remembered = internal.get(call["id"], {})
    return remembered.get("arguments", "{}"), remembered.get("output", "")
