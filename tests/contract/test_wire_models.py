"""Every response wire model, rendered as the server renders it, against the
SDK's own types and the official OpenAPI schemas.

The instances are built the way the routes build them (the services'
``to_wire`` over in-memory ORM rows), so a field renamed in a service or a
wire model shows up here without a database.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.pagination import AsyncCursorPage
from openai.types import FileDeleted, FileObject
from openai.types.beta import Assistant, AssistantDeleted, Thread, ThreadDeleted
from openai.types.beta.threads import Message, MessageDeleted
from pydantic import BaseModel, ValidationError

from app import ids, orm
from app.services import assistants, files, messages, pagination, threads
from app.wire import common
from app.wire.common import Deleted
from app.wire.messages import MessageCreate
from app.wire.runs import ThreadAndRunCreate
from tests import oas

SEQ = 1_795_000_000_123_456_789


def _id(prefix: str, offset: int = 0) -> str:
    return ids.new_id(prefix, SEQ + offset)


def assistant_row(**overrides: Any) -> orm.Assistant:
    fields: dict[str, Any] = {
        "id": _id(ids.ASSISTANT),
        "seq": SEQ,
        "created_at": ids.seconds(SEQ),
        "model": "gpt-4o",
        "name": "Math Tutor",
        "description": None,
        "instructions": "You are a personal math tutor.",
        "reasoning_effort": None,
        "tools": [
            {"type": "code_interpreter"},
            common.tool_to_wire(common.FileSearchTool(type="file_search")),
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "strict": False}},
        ],
        "tool_resources": {"code_interpreter": {"file_ids": [_id(ids.FILE)]}},
        "metadata_": {"team": "math"},
        "temperature": None,
        "top_p": 0.5,
        "response_format": None,
    }
    return orm.Assistant(**{**fields, **overrides})


def thread_row(**overrides: Any) -> orm.Thread:
    fields: dict[str, Any] = {
        "id": _id(ids.THREAD),
        "seq": SEQ,
        "created_at": ids.seconds(SEQ),
        "tool_resources": {},
        "metadata_": {},
    }
    return orm.Thread(**{**fields, **overrides})


def message_row(**overrides: Any) -> orm.Message:
    file_id = _id(ids.FILE)
    fields: dict[str, Any] = {
        "id": _id(ids.MESSAGE, 1),
        "seq": SEQ + 1,
        "created_at": ids.seconds(SEQ),
        "thread_id": _id(ids.THREAD),
        "role": "user",
        "content": [
            messages.text_part("Solve 3x + 11 = 14 — 日本語 مرحبا 🧮"),
            {"type": "image_file", "image_file": {"file_id": file_id, "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        ],
        "status": "completed",
        "incomplete_details": None,
        "completed_at": ids.seconds(SEQ),
        "incomplete_at": None,
        "assistant_id": None,
        "run_id": None,
        "attachments": [{"file_id": file_id, "tools": [{"type": "code_interpreter"}, {"type": "file_search"}]}],
        "metadata_": {"k": "v"},
    }
    return orm.Message(**{**fields, **overrides})


def file_row(**overrides: Any) -> orm.File:
    fields: dict[str, Any] = {
        "id": _id(ids.FILE),
        "seq": SEQ,
        "created_at": ids.seconds(SEQ),
        "bytes": 2,
        "filename": "a.txt",
        "purpose": "assistants",
        "expires_at": None,
        "status": "processed",
        "status_details": None,
    }
    return orm.File(**{**fields, **overrides})


def wire_json(model: BaseModel) -> dict[str, Any]:
    """What a client receives: the route's own serialization, parsed back."""
    data: dict[str, Any] = json.loads(model.model_dump_json())
    return data


def assert_no_extras(model: Any, path: str = "$") -> None:
    """No key the SDK type does not know, anywhere in the parsed tree."""
    if isinstance(model, BaseModel):
        assert not model.model_extra, f"{path}: keys unknown to {type(model).__name__}: {set(model.model_extra)}"
        for name in type(model).model_fields:
            assert_no_extras(getattr(model, name), f"{path}.{name}")
    elif isinstance(model, list):
        for index, item in enumerate(model):
            assert_no_extras(item, f"{path}[{index}]")


def assert_matches_sdk(data: dict[str, Any], sdk_type: type[BaseModel]) -> BaseModel:
    parsed = sdk_type.model_validate(data)
    fields = sdk_type.model_fields
    assert set(data) <= set(fields), f"unknown to the SDK: {set(data) - set(fields)}"
    required = {name for name, field in fields.items() if field.is_required()}
    assert required <= set(data), f"missing: {required - set(data)}"
    assert_no_extras(parsed)
    # Re-dumping with the SDK must give back exactly what we sent.
    assert parsed.model_dump(mode="json", exclude_unset=True) == data
    return parsed


def assert_matches_schema(data: dict[str, Any], schema_name: str) -> None:
    oas.validate(data, schema_name)
    schema = oas.spec()["components"]["schemas"][schema_name]
    assert set(schema.get("required", [])) <= set(data)
    assert set(data) <= set(schema["properties"]), f"not in {schema_name}: {set(data) - set(schema['properties'])}"


OBJECTS = [
    pytest.param(lambda: assistants.to_wire(assistant_row()), Assistant, "AssistantObject", id="assistant"),
    pytest.param(
        lambda: assistants.to_wire(
            assistant_row(
                name=None, instructions=None, tools=[], tool_resources={}, response_format={"type": "json_object"}
            )
        ),
        Assistant,
        "AssistantObject",
        id="assistant-bare",
    ),
    pytest.param(lambda: threads.to_wire(thread_row()), Thread, "ThreadObject", id="thread"),
    pytest.param(
        lambda: threads.to_wire(
            thread_row(
                tool_resources={
                    "code_interpreter": {"file_ids": [_id(ids.FILE)]},
                    "file_search": {"vector_store_ids": []},
                },
                metadata_={"user": "ユーザー"},
            )
        ),
        Thread,
        "ThreadObject",
        id="thread-with-resources",
    ),
    pytest.param(lambda: messages.to_wire(message_row()), Message, "MessageObject", id="message"),
    pytest.param(
        lambda: messages.to_wire(
            message_row(
                role="assistant",
                content=[messages.text_part("partial")],
                status="incomplete",
                incomplete_details={"reason": "run_cancelled"},
                completed_at=None,
                incomplete_at=ids.seconds(SEQ) + 3,
                assistant_id=_id(ids.ASSISTANT),
                run_id=_id(ids.RUN),
                attachments=[],
                metadata_={},
            )
        ),
        Message,
        "MessageObject",
        id="message-incomplete-assistant",
    ),
    pytest.param(lambda: files.to_wire(file_row()), FileObject, "OpenAIFile", id="file"),
    pytest.param(
        lambda: files.to_wire(file_row(expires_at=ids.seconds(SEQ) + 3600, purpose="assistants_output")),
        FileObject,
        "OpenAIFile",
        id="file-expiring",
    ),
    pytest.param(
        lambda: Deleted(id=_id(ids.ASSISTANT), object="assistant.deleted"),
        AssistantDeleted,
        "DeleteAssistantResponse",
        id="assistant-deleted",
    ),
    pytest.param(
        lambda: Deleted(id=_id(ids.THREAD), object="thread.deleted"),
        ThreadDeleted,
        "DeleteThreadResponse",
        id="thread-deleted",
    ),
    pytest.param(
        lambda: Deleted(id=_id(ids.MESSAGE), object="thread.message.deleted"),
        MessageDeleted,
        "DeleteMessageResponse",
        id="message-deleted",
    ),
    pytest.param(
        lambda: Deleted(id=_id(ids.FILE), object="file"), FileDeleted, "DeleteFileResponse", id="file-deleted"
    ),
]


@pytest.mark.parametrize(("build", "sdk_type", "schema_name"), OBJECTS)
def test_object_matches_sdk_and_spec(build: Any, sdk_type: type[BaseModel], schema_name: str) -> None:
    data = wire_json(build())
    assert_matches_sdk(data, sdk_type)
    assert_matches_schema(data, schema_name)


def test_message_text_part_is_the_response_form() -> None:
    """Requests send ``"text": "..."``; responses nest it with annotations."""
    data = wire_json(messages.to_wire(message_row()))
    assert data["content"][0] == {
        "type": "text",
        "text": {"value": "Solve 3x + 11 = 14 — 日本語 مرحبا 🧮", "annotations": []},
    }
    parsed = Message.model_validate(data)
    assert parsed.content[0].type == "text" and parsed.content[0].text.annotations == []


def test_nullable_fields_are_sent_as_null_not_left_out() -> None:
    """go-openai and strict clients see the same keys on every object."""
    message = wire_json(messages.to_wire(message_row()))
    for key in ("incomplete_details", "incomplete_at", "assistant_id", "run_id"):
        assert key in message and message[key] is None
    assistant = wire_json(assistants.to_wire(assistant_row(description=None)))
    assert assistant["description"] is None
    assert assistant["temperature"] == 1.0 and assistant["response_format"] == "auto"
    # Optional (not nullable) in the spec: left out rather than null.
    file = wire_json(files.to_wire(file_row()))
    assert "expires_at" not in file and "status_details" not in file


@pytest.mark.parametrize(
    ("rows", "to_wire", "sdk_type", "schema_name"),
    [
        pytest.param(
            lambda: [message_row(id=_id(ids.MESSAGE, i), seq=SEQ + i) for i in range(3)],
            messages.to_wire,
            Message,
            "ListMessagesResponse",
            id="messages",
        ),
        pytest.param(
            lambda: [assistant_row(id=_id(ids.ASSISTANT, i), seq=SEQ + i) for i in range(2)],
            assistants.to_wire,
            Assistant,
            "ListAssistantsResponse",
            id="assistants",
        ),
        pytest.param(
            lambda: [file_row(id=_id(ids.FILE, i), seq=SEQ + i) for i in range(2)],
            files.to_wire,
            FileObject,
            "ListFilesResponse",
            id="files",
        ),
    ],
)
def test_list_page(rows: Any, to_wire: Any, sdk_type: type[BaseModel], schema_name: str) -> None:
    items = [to_wire(row) for row in rows()]
    data = wire_json(pagination.page(items, has_more=True))
    assert list(data) == ["object", "data", "first_id", "last_id", "has_more"]
    assert data["object"] == "list" and data["has_more"] is True
    assert data["first_id"] == items[0].id and data["last_id"] == items[-1].id
    oas.validate(data, schema_name)
    for item in data["data"]:
        assert_matches_sdk(item, sdk_type)
    # The SDK's page type reads data and has_more (auto-paging stops on has_more).
    page = AsyncCursorPage[sdk_type].model_validate(data)  # type: ignore[valid-type]
    assert page.has_more is True and len(page.data) == len(items)


def test_empty_list_page_has_null_cursors() -> None:
    data = wire_json(pagination.page([], has_more=False))
    assert data == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
    page = AsyncCursorPage[Message].model_validate(data)
    assert page.data == [] and page.has_more is False


def _nested(levels: int, innermost: Any, container: str) -> Any:
    value = innermost
    for _ in range(levels):
        value = {"k": value} if container == "dict" else [value]
    return value


@pytest.mark.parametrize(
    "body",
    [
        {"model": "gpt-4o", "metadata": {"a": "b"}, "tools": [{"type": "code_interpreter"}], "n": 1, "x": None},
        {"messages": [{"content": [{"type": "text", "text": "fine"}, {"text": "bad\x00"}]}]},
        {"messages": [{"content": "half \ud800 surrogate"}]},
        {"metadata": {"bad\x00key": "v"}},
        {"deep": _nested(98, "ok", "dict")},
        {"deep": _nested(99, "ok", "list")},
        {"deep": _nested(99, {}, "dict")},
        {"deep": _nested(100, [], "list")},
        {"deep": _nested(100, "ok", "dict")},
        {"deep": _nested(200, "bad\x00", "list")},
        {"list": ["a", ["b", {"c": ["\udfff"]}]]},
    ],
)
def test_the_quick_storable_check_agrees_with_the_walk_that_names_the_problem(body: dict[str, Any]) -> None:
    assert common._all_storable(body, 1) == (common._first_unstorable(body) is None)


def _unstorable_at(model: type[BaseModel], body: dict[str, Any]) -> str | None:
    """Where ``model`` finds a string it cannot store in ``body`` (the error's parameter path), if anywhere."""
    try:
        model.model_validate(body)
    except ValidationError as exc:
        (error,) = [error for error in exc.errors() if error["type"] == "invalid_value"]
        return str(error["ctx"]["param_suffix"])
    return None


def test_a_body_is_checked_for_unstorable_strings_once_whole_and_each_model_alone_still_checks_its_own() -> None:
    """The outermost request model checks its whole body (the path from its
    root); the models nested in it do not walk their parts again. Validated
    alone, after a body passed or failed, a nested model checks its own."""
    bad = [{"role": "user", "content": "ok"}, {"role": "user", "content": [{"type": "text", "text": "b\x00"}]}]
    assert _unstorable_at(ThreadAndRunCreate, {"assistant_id": "a", "thread": {"messages": bad}}) == (
        ".thread.messages[1].content[0].text"
    )
    assert _unstorable_at(ThreadAndRunCreate, {"assistant_id": "a", "thread": {"messages": bad[:1]}}) is None
    assert _unstorable_at(MessageCreate, bad[1]) == ".content[0].text"


def test_a_model_that_omits_fields_must_derive_from_the_omitting_base() -> None:
    """omit_when_none does its work only under OmittingWireModel's
    serializer: declared on a plain WireModel it is refused, rather than
    quietly sending nulls."""
    from typing import ClassVar

    with pytest.raises(TypeError, match="derive it from OmittingWireModel"):

        class Plain(common.WireModel):
            omit_when_none: ClassVar[frozenset[str]] = frozenset({"note"})
            note: str | None = None

    class Omitting(common.OmittingWireModel):
        omit_when_none: ClassVar[frozenset[str]] = frozenset({"note"})
        note: str | None = None

    assert Omitting().model_dump() == {}
