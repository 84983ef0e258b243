"""Assistants v1 <-> v2 shapes: what a v1 client sends becomes a v2 request,
and what the v2 code answers becomes a v1 object (OpenAI's spec of April
2024, the last with v1: tests/openapi/assistants-v1.openapi.json).

The mapping is OpenAI's own migration mapping:

- the ``retrieval`` tool is ``file_search``; a retrieval tool call in a run
  step is ``{"type": "retrieval", "retrieval": {}}``;
- an assistant's ``file_ids`` are its ``tool_resources.code_interpreter.file_ids``
  (the canonical v1 list, whichever tools are on); with retrieval on, the
  same files are also in a vector store the server manages for the
  assistant (app/services/v1_files.py);
- a message's ``file_ids`` are its attachments, offered to both tools;
- objects lose the fields v1 did not have (``tool_resources``, ...).

Pure functions over JSON values; the lookups that need the database
(``file_ids`` of an assistant or a run) are passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

JSON = dict[str, Any]
# file_ids of an assistant, by id (filled from the database before rendering).
FileIds = Mapping[str, list[str]]

MAX_ASSISTANT_FILES = 20
MAX_MESSAGE_FILES = 10
MANAGED_STORE_METADATA = {"assistants_v1": "retrieval"}

# v1 objects' fields, in the spec's order (anything else the v2 code adds is dropped).
_ASSISTANT = ("id", "object", "created_at", "name", "description", "model", "instructions", "tools", "file_ids")
_MESSAGE = (
    "id",
    "object",
    "created_at",
    "thread_id",
    "status",
    "incomplete_details",
    "completed_at",
    "incomplete_at",
    "role",
    "content",
    "assistant_id",
    "run_id",
    "file_ids",
    "metadata",
)
_RUN = (
    "id",
    "object",
    "created_at",
    "thread_id",
    "assistant_id",
    "status",
    "required_action",
    "last_error",
    "expires_at",
    "started_at",
    "cancelled_at",
    "failed_at",
    "completed_at",
    "incomplete_details",
    "model",
    "instructions",
    "tools",
    "file_ids",
    "metadata",
    "usage",
    "temperature",
    "max_prompt_tokens",
    "max_completion_tokens",
    "truncation_strategy",
    "tool_choice",
    "response_format",
)


class V1Error(ValueError):
    """A v1 request that cannot be served; ``param`` names the v1 field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


# ------------------------------------------------------------------ requests


def tools_to_v2(tools: Any) -> Any:
    if not isinstance(tools, list):
        return tools
    return [{"type": "file_search"} if _is(tool, "retrieval") else tool for tool in tools]


def _is(tool: Any, kind: str) -> bool:
    return isinstance(tool, dict) and tool.get("type") == kind


def file_ids_of(body: JSON, limit: int, param: str = "file_ids") -> list[str] | None:
    """The request's v1 ``file_ids`` (None when absent), checked as v1 did."""
    if "file_ids" not in body or body["file_ids"] is None:
        return None
    value = body["file_ids"]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise V1Error(f"Invalid type for '{param}': expected an array of strings.", param)
    if len(value) > limit:
        raise V1Error(
            f"Invalid '{param}': array too long. Expected an array with maximum length {limit}, "
            f"but got an array with length {len(value)} instead.",
            param,
        )
    return list(dict.fromkeys(value))


def assistant_to_v2(body: JSON, *, creating: bool) -> tuple[JSON, list[str] | None]:
    """A v1 create/modify body as v2, and its ``file_ids`` (None: unchanged).

    The files go to ``code_interpreter.file_ids``; on create with retrieval
    they also seed the managed store through v2's ``vector_stores`` helper."""
    body = dict(body)
    file_ids = file_ids_of(body, MAX_ASSISTANT_FILES)
    body.pop("file_ids", None)
    if "tools" in body:
        body["tools"] = tools_to_v2(body["tools"])
    if file_ids is not None:
        resources: JSON = {"code_interpreter": {"file_ids": file_ids}}
        retrieval = any(_is(tool, "file_search") for tool in body.get("tools") or [])
        if creating and retrieval and file_ids:
            resources["file_search"] = {
                "vector_stores": [{"file_ids": file_ids, "metadata": dict(MANAGED_STORE_METADATA)}]
            }
        body["tool_resources"] = resources
    return body, file_ids


def message_to_v2(body: JSON, param: str = "file_ids") -> JSON:
    """v1 message ``file_ids`` become attachments for both tools."""
    body = dict(body)
    file_ids = file_ids_of(body, MAX_MESSAGE_FILES, param)
    body.pop("file_ids", None)
    if file_ids:
        both = [{"type": "code_interpreter"}, {"type": "file_search"}]
        body["attachments"] = [{"file_id": file_id, "tools": both} for file_id in file_ids]
    return body


def thread_to_v2(body: JSON, param: str = "messages") -> JSON:
    body = dict(body)
    messages = body.get("messages")
    if isinstance(messages, list):
        body["messages"] = [
            message_to_v2(message, f"{param}[{n}].file_ids") if isinstance(message, dict) else message
            for n, message in enumerate(messages)
        ]
    return body


def run_to_v2(body: JSON) -> JSON:
    body = dict(body)
    if "tools" in body:
        body["tools"] = tools_to_v2(body["tools"])
    if isinstance(body.get("thread"), dict):
        body["thread"] = thread_to_v2(body["thread"], "thread.messages")
    if isinstance(body.get("additional_messages"), list):
        body["additional_messages"] = [
            message_to_v2(message, f"additional_messages[{n}].file_ids") if isinstance(message, dict) else message
            for n, message in enumerate(body["additional_messages"])
        ]
    return body


# ------------------------------------------------------------------ responses


def tools_to_v1(tools: Any) -> list[JSON]:
    out: list[JSON] = []
    for tool in tools or []:
        if _is(tool, "file_search"):
            out.append({"type": "retrieval"})
        elif _is(tool, "function"):
            function = {key: value for key, value in tool["function"].items() if key != "strict"}
            out.append({"type": "function", "function": function})
        else:
            out.append(tool)
    return out


def _pick(obj: JSON, fields: tuple[str, ...]) -> JSON:
    return {field: obj.get(field) for field in fields}


def assistant_to_v1(obj: JSON, file_ids: FileIds) -> JSON:
    out = _pick(obj, _ASSISTANT)
    out["tools"] = tools_to_v1(obj.get("tools"))
    out["file_ids"] = file_ids.get(obj["id"], [])
    out["metadata"] = obj.get("metadata") or {}
    return out


def thread_to_v1(obj: JSON) -> JSON:
    return {key: obj.get(key) for key in ("id", "object", "created_at", "metadata")}


def _annotation_to_v1(annotation: JSON) -> JSON:
    if annotation.get("type") == "file_citation":
        citation = dict(annotation.get("file_citation") or {})
        citation.setdefault("quote", "")
        return {**annotation, "file_citation": citation}
    return annotation


def content_to_v1(parts: Any) -> list[JSON]:
    """v1 content had text and image_file only; an image_url part becomes text
    naming it (the nearest v1 shape), refusals become text."""
    out: list[JSON] = []
    for part in parts or []:
        kind = part.get("type")
        if kind == "text":
            text = dict(part["text"])
            if "annotations" in text:
                text["annotations"] = [_annotation_to_v1(note) for note in text["annotations"] or []]
            out.append({**part, "text": text})
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            out.append({**part, "type": "text", "text": {"value": f"[image: {url}]", "annotations": []}})
            out[-1].pop("image_url", None)
        elif kind == "refusal":
            value = part.get("refusal", "")
            if "index" in part:  # a delta's piece: annotations are optional there
                out.append({"index": part["index"], "type": "text", "text": {"value": value}})
            else:  # a whole message's part, whose text v1 requires annotations of
                out.append({"type": "text", "text": {"value": value, "annotations": []}})
        else:
            out.append(part)
    return out


def message_to_v1(obj: JSON) -> JSON:
    out = _pick(obj, _MESSAGE)
    out["content"] = content_to_v1(obj.get("content"))
    out["file_ids"] = [attachment["file_id"] for attachment in obj.get("attachments") or []]
    out["metadata"] = obj.get("metadata") or {}
    return out


def message_delta_to_v1(obj: JSON) -> JSON:
    delta = dict(obj.get("delta") or {})
    if "content" in delta:
        delta["content"] = content_to_v1(delta["content"])
    if "attachments" in delta:
        delta["file_ids"] = [attachment["file_id"] for attachment in delta.pop("attachments") or []]
    return {**obj, "delta": delta}


def run_to_v1(obj: JSON, file_ids: FileIds) -> JSON:
    out = _pick(obj, _RUN)
    out["tools"] = tools_to_v1(obj.get("tools"))
    out["file_ids"] = file_ids.get(obj.get("assistant_id") or "", [])
    out["metadata"] = obj.get("metadata") or {}
    choice = obj.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "file_search":
        out["tool_choice"] = {"type": "retrieval"}
    return out


def _tool_call_to_v1(call: JSON) -> JSON:
    if call.get("type") == "file_search":
        out: JSON = {key: call[key] for key in ("index", "id") if key in call}
        return {**out, "type": "retrieval", "retrieval": {}}
    return call


def step_to_v1(obj: JSON) -> JSON:
    details = dict(obj.get("step_details") or {})
    if details.get("type") == "tool_calls":
        details["tool_calls"] = [_tool_call_to_v1(call) for call in details.get("tool_calls") or []]
    return {**obj, "step_details": details}


def step_delta_to_v1(obj: JSON) -> JSON:
    delta = dict(obj.get("delta") or {})
    details = dict(delta.get("step_details") or {})
    if details.get("type") == "tool_calls":
        details["tool_calls"] = [_tool_call_to_v1(call) for call in details.get("tool_calls") or []]
        delta["step_details"] = details
    return {**obj, "delta": delta}


def to_v1(obj: Any, file_ids: FileIds) -> Any:
    """Any v2 response object (or list of them) in its v1 shape."""
    if not isinstance(obj, dict):
        return obj
    kind = obj.get("object")
    converters: dict[str, Callable[[JSON], JSON]] = {
        "assistant": lambda value: assistant_to_v1(value, file_ids),
        "thread": thread_to_v1,
        "thread.message": message_to_v1,
        "thread.message.delta": message_delta_to_v1,
        "thread.run": lambda value: run_to_v1(value, file_ids),
        "thread.run.step": step_to_v1,
        "thread.run.step.delta": step_delta_to_v1,
    }
    if kind == "list":
        return {**obj, "data": [to_v1(item, file_ids) for item in obj.get("data") or []]}
    converter = converters.get(str(kind))
    return converter(obj) if converter is not None else obj


def assistants_named(obj: Any) -> set[str]:
    """Ids of the assistants whose file_ids rendering ``obj`` needs."""
    if not isinstance(obj, dict):
        return set()
    if obj.get("object") == "list":
        return set().union(*(assistants_named(item) for item in obj.get("data") or []))
    if obj.get("object") == "assistant":
        return {obj["id"]}
    if obj.get("object") == "thread.run" and obj.get("assistant_id"):
        return {obj["assistant_id"]}
    return set()
