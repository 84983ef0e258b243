"""The v1 requests v2 has no route for: assistant files, message files, and
assistant modify (whose ``file_ids`` keep a managed retrieval store in step)."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qs

from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from app import errors, ids
from app.api.asgi_body import read_body
from app.api.deps import project_of
from app.api.handlers import error_response
from app.api.v1compat import shapes
from app.runtime import Runtime
from app.services import assistants, messages, v1_files
from app.services.common import require_id
from app.services.projects import Project
from app.wire.assistants import AssistantUpdate

Answer = tuple[int, Any]

_MODIFY = re.compile(r"^/assistants/(?P<assistant>[^/]+)/?$")
_ASSISTANT_FILES = re.compile(r"^/assistants/(?P<assistant>[^/]+)/files/?(?P<file>[^/]+)?/?$")
_MESSAGE_FILES = re.compile(r"^/threads/(?P<thread>[^/]+)/messages/(?P<message>[^/]+)/files/?(?P<file>[^/]+)?/?$")


async def send_json(send: Send, status: int, value: Any) -> None:
    body = json.dumps(value, ensure_ascii=False).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: errors.APIError) -> None:
    response = error_response(error)
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": [(k.encode(), v.encode()) for k, v in response.headers.items()],
        }
    )
    await send({"type": "http.response.body", "body": response.body})


async def render_v1(runtime: Runtime, value: Any) -> Any:
    """A v2 response value as v1, with the file_ids it needs read from the database."""
    needed = shapes.assistants_named(value)
    file_ids: dict[str, list[str]] = {}
    if needed:
        async with runtime.transaction() as session:
            file_ids = await v1_files.file_ids_of(session, needed)
    return shapes.to_v1(value, file_ids)


async def _json_body(receive: Receive) -> dict[str, Any]:
    raw = await read_body(receive)
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError:
        raise errors.invalid(errors.JSON_PARSE_MESSAGE) from None
    if not isinstance(body, dict):
        raise errors.invalid(errors.JSON_PARSE_MESSAGE)
    return body


def _page(scope: Scope) -> tuple[int, str, str | None, str | None]:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    raw_limit = (query.get("limit") or ["20"])[0]
    if not (raw_limit.isascii() and raw_limit.isdigit()) or not 1 <= int(raw_limit) <= 100:
        raise errors.invalid(
            f"Invalid 'limit': integer below minimum value. Expected a value >= 1 and <= 100, got {raw_limit}.",
            param="limit",
        )
    order = (query.get("order") or ["desc"])[0]
    if order not in ("asc", "desc"):
        raise errors.invalid(f"Invalid 'order': expected one of 'asc' or 'desc', got '{order}'.", param="order")
    return int(raw_limit), order, (query.get("after") or [None])[0], (query.get("before") or [None])[0]


def _list(scope: Scope, items: list[dict[str, Any]]) -> dict[str, Any]:
    """v1 list pages over a short in-memory list (≤ 20 assistant files, ≤ 10 message files)."""
    limit, order, after, before = _page(scope)
    ordered = sorted(items, key=lambda item: (item["created_at"], item["id"]), reverse=order == "desc")
    position = [item["id"] for item in ordered]
    if after in position:
        ordered = ordered[position.index(after) + 1 :]
    if before in position:
        ordered = ordered[: position.index(before)]
    page = ordered[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(ordered) > limit,
    }


async def dispatch(runtime: Runtime, scope: Scope, path: str, receive: Receive) -> Answer | None:
    method = scope.get("method", "GET")
    project = project_of(scope)
    if (match := _ASSISTANT_FILES.match(path)) is not None:
        return await _assistant_files(runtime, scope, project, method, match["assistant"], match["file"], receive)
    if (match := _MESSAGE_FILES.match(path)) is not None:
        if method != "GET":
            raise errors.APIError(404, f"Invalid URL ({method} {scope.get('path')})")
        return await _message_files(runtime, scope, project, match["thread"], match["message"], match["file"])
    if method == "POST" and (match := _MODIFY.match(path)) is not None:
        return await _modify_assistant(runtime, project, match["assistant"], await _json_body(receive))
    return None


async def _modify_assistant(runtime: Runtime, project: Project, assistant_id: str, body: dict[str, Any]) -> Answer:
    v2_body, file_ids = shapes.assistant_to_v2(body, creating=False)
    v2_body.pop("tool_resources", None)  # the files are set below, the managed store kept
    try:
        update = AssistantUpdate.model_validate(v2_body)
    except ValidationError as exc:
        raise errors.from_validation_errors(exc.errors(), v2_body) from None
    async with runtime.transaction() as session:
        row = await assistants.update(session, project, assistant_id, update)
        if file_ids is not None:
            await v1_files.set_files(session, row, file_ids)
        else:
            await v1_files.sync_store(session, row)
        wire = json.loads(assistants.to_wire(row).model_dump_json())
        files = await v1_files.file_ids_of(session, [row.id])
    return 200, shapes.to_v1(wire, files)


def _assistant_file(file_id: str, created_at: int, assistant_id: str) -> dict[str, Any]:
    return {"id": file_id, "object": "assistant.file", "created_at": created_at, "assistant_id": assistant_id}


async def _assistant_files(
    runtime: Runtime,
    scope: Scope,
    project: Project,
    method: str,
    assistant_id: str,
    file_id: str | None,
    receive: Receive,
) -> Answer:
    async with runtime.transaction() as session:
        assistant = await assistants.get(session, project, assistant_id)
        if method == "POST" and file_id is None:
            body = await _json_body(receive)
            wanted = body.get("file_id")
            if not isinstance(wanted, str) or not wanted:
                raise errors.invalid(
                    "Missing required parameter: 'file_id'.", param="file_id", code="missing_required_parameter"
                )
            require_id("file_id", wanted, ids.FILE)
            file = await v1_files.add_file(session, assistant, wanted, shapes.MAX_ASSISTANT_FILES)
            return 200, _assistant_file(file.id, file.created_at, assistant.id)
        current = v1_files.code_interpreter_files(assistant.tool_resources)
        files = await v1_files.files_by_id(session, project, current)
        if file_id is None and method == "GET":
            items = [_assistant_file(f, files[f].created_at, assistant.id) for f in current if f in files]
            return 200, _list(scope, items)
        if file_id is None or file_id not in current:
            raise errors.not_found("assistant file", file_id or "")
        if method == "GET":
            return 200, _assistant_file(file_id, files[file_id].created_at if file_id in files else 0, assistant.id)
        if method == "DELETE":
            await v1_files.remove_file(session, assistant, file_id)
            return 200, {"id": file_id, "object": "assistant.file.deleted", "deleted": True}
    raise errors.APIError(404, f"Invalid URL ({method} {scope.get('path')})")


async def _message_files(
    runtime: Runtime, scope: Scope, project: Project, thread_id: str, message_id: str, file_id: str | None
) -> Answer:
    async with runtime.transaction() as session:
        message = await messages.get(session, project, thread_id, message_id)
    attached = [item["file_id"] for item in message.attachments or []]
    items = [
        {"id": f, "object": "thread.message.file", "created_at": message.created_at, "message_id": message.id}
        for f in attached
    ]
    if file_id is None:
        return 200, _list(scope, items)
    for item in items:
        if item["id"] == file_id:
            return 200, item
    raise errors.not_found("message file", file_id)
