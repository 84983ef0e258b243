"""What the model is sent: instructions, the thread's history (truncated as the
run's truncation_strategy and token limits say) and the run's own steps so far."""

from __future__ import annotations

import base64
import mimetypes
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession

from app import orm
from app.llm import LLM
from app.runner.tools import BuiltinTool, chat_history, code_interpreter
from app.services import run_execution, run_steps
from app.storage import Storage

# Room left for the answer when fitting the prompt into the context window.
DEFAULT_COMPLETION_RESERVE = 4096


@dataclass
class Budget:
    """Token limits for one model call."""

    prompt_tokens: int | None  # left under max_prompt_tokens (None: unlimited)
    completion_tokens: int | None  # left under max_completion_tokens


def chat_tools(tools: list[dict[str, Any]], builtins: dict[str, BuiltinTool]) -> list[dict[str, Any]]:
    """The run's tools in chat-completions form; a built-in tool is a function
    named after its type, defined by its own module."""
    offered = []
    for tool in tools:
        if tool.get("type") in builtins:
            offered.append(builtins[tool["type"]].definition(tool))
        elif tool.get("type") == "function":
            function = {key: value for key, value in tool["function"].items() if key != "strict" or value}
            offered.append({"type": "function", "function": function})
    return offered


def chat_tool_choice(choice: Any, offered: list[dict[str, Any]], builtins: dict[str, BuiltinTool]) -> Any:
    if not offered:
        return None
    if isinstance(choice, dict) and choice.get("type") != "function":
        if choice.get("type") in builtins:
            return {"type": "function", "function": {"name": choice["type"]}}
        return "auto"  # a built-in tool this server does not run
    return choice


def _image_data_url(storage: Storage, file: orm.File | None, file_id: str) -> str | None:
    if file is None or not storage.exists(file_id):
        return None
    mime = mimetypes.guess_type(file.filename)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(storage.path(file_id).read_bytes()).decode()}"


class _Content(Protocol):
    """A message as a prompt reads it: an orm.Message, or a row of its columns."""

    @property
    def content(self) -> list[dict[str, Any]]: ...


async def _message_content(session: AsyncSession, storage: Storage, message: _Content) -> Any:
    parts: list[dict[str, Any]] = []
    for part in message.content:
        if part["type"] == "text":
            parts.append({"type": "text", "text": part["text"]["value"]})
        elif part["type"] == "refusal":
            # The model's earlier refusal, as its text: every provider takes
            # that (an assistant message's ``refusal`` field is OpenAI's own),
            # and an empty assistant message is refused by some.
            parts.append({"type": "text", "text": part["refusal"]})
        elif part["type"] == "image_url":
            parts.append({"type": "image_url", "image_url": part["image_url"]})
        elif part["type"] == "image_file":
            file_id = part["image_file"]["file_id"]
            url = _image_data_url(storage, await session.get(orm.File, file_id), file_id)
            if url is not None:
                detail = part["image_file"].get("detail")
                parts.append({"type": "image_url", "image_url": {"url": url, **({"detail": detail} if detail else {})}})
    if all(part["type"] == "text" for part in parts):
        # Plain strings work with every provider, vision or not.
        return "\n".join(part["text"] for part in parts)
    return parts


async def history(session: AsyncSession, storage: Storage, run: orm.Run) -> list[dict[str, Any]]:
    """The thread's messages before this run, oldest first, in chat form."""
    rows = await run_execution.earlier_messages(session, run)
    return [{"role": row.role, "content": await _message_content(session, storage, row)} for row in rows]


async def run_section(session: AsyncSession, storage: Storage, run: orm.Run) -> list[dict[str, Any]]:
    """What the run itself has produced so far: its messages and tool rounds."""
    section: list[dict[str, Any]] = []
    for step in await run_steps.records_of_run(session, run.id):
        details = step.step_details
        if step.type == "message_creation":
            message = await session.get(orm.Message, details["message_creation"]["message_id"])
            if message is not None and message.content:
                section.append({"role": "assistant", "content": await _message_content(session, storage, message)})
            continue
        made = (_chat_call(call, step.internal or {}) for call in details.get("tool_calls", []))
        calls: list[dict[str, Any]] = [call for call in made if call is not None]
        if not calls:
            continue
        section.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": c["id"], "type": "function", "function": c["function"]} for c in calls],
            }
        )
        section.extend({"role": "tool", "tool_call_id": c["id"], "content": c["output"]} for c in calls)
    return section


def _chat_call(call: dict[str, Any], internal: dict[str, Any]) -> dict[str, Any] | None:
    """A step's tool call as the model made it (None if it never finished)."""
    if call.get("type") == "function":
        function = call["function"]
        return {
            "id": call["id"],
            "function": {"name": function["name"], "arguments": function["arguments"]},
            "output": function.get("output") or "",
        }
    if call["id"] not in internal:
        return None
    arguments, output = chat_history(call, internal)
    return {"id": call["id"], "function": {"name": call["type"], "arguments": arguments}, "output": output}


def truncate(
    llm: LLM,
    run: orm.Run,
    system: list[dict[str, Any]],
    past: list[dict[str, Any]],
    current: list[dict[str, Any]],
    budget: Budget,
) -> list[dict[str, Any]]:
    """Apply truncation_strategy, then drop the oldest history until the prompt
    fits the context window (and what is left of max_prompt_tokens)."""
    strategy = run.truncation_strategy or {"type": "auto"}
    if strategy.get("type") == "last_messages" and strategy.get("last_messages"):
        past = past[-int(strategy["last_messages"]) :]
    reserve = min(budget.completion_tokens or DEFAULT_COMPLETION_RESERVE, DEFAULT_COMPLETION_RESERVE)
    limit = max(llm.context_window(run.model) - reserve, 1)
    if budget.prompt_tokens is not None:
        limit = min(limit, budget.prompt_tokens)
    # The newest message always stays: without it there is nothing to answer
    # (if even it does not fit, the executor ends the run incomplete).
    while len(past) > 1 and llm.count_tokens(run.model, system + past + current) > limit:
        past = past[1:]
    return system + past + current


async def code_files_note(session: AsyncSession, run: orm.Run) -> str | None:
    """What a model needs to know to use code_interpreter's input files: their
    names and sizes under /mnt/data (issue 12). None if the run offers no
    code_interpreter or gives it no files."""
    if not any(tool.get("type") == code_interpreter.TYPE for tool in run.tools or []):
        return None
    rows = await code_interpreter.input_file_rows(session, run)
    if not rows:
        return None
    listed = "\n".join(f"- /mnt/data/{row.filename} ({row.bytes} bytes)" for row in rows)
    return f"Files available to code_interpreter in /mnt/data:\n{listed}"


async def build(
    session: AsyncSession, storage: Storage, llm: LLM, run: orm.Run, budget: Budget, *, has_steps: bool = True
) -> list[dict[str, Any]]:
    system = [{"role": "system", "content": run.instructions}] if run.instructions else []
    note = await code_files_note(session, run)
    if note is not None:
        system.append({"role": "system", "content": note})
    past = await history(session, storage, run)
    current = await run_section(session, storage, run) if has_steps else []
    return truncate(llm, run, system, past, current, budget)
