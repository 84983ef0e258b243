"""Assistants v1 (``OpenAI-Beta: assistants=v1``) over the v2 store, on both
databases: requests shaped like go-openai v1.20's (nulls, ``"model": ""``),
every v1 response checked against the v1 OpenAPI document of April 2024, and
v1 and v2 clients on the same objects."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.oas import _honour_nullable

pytestmark = pytest.mark.timeout(60)
V1 = {"OpenAI-Beta": "assistants=v1"}
V1_SPEC = Path(__file__).resolve().parents[1] / "openapi" / "assistants-v1.openapi.json"


def _without_phantom_required(node: Any) -> Any:
    """The v1 document's list responses require a property ``items`` that they
    do not define (a slip in OpenAI's spec; its API never sent one)."""
    if isinstance(node, list):
        return [_without_phantom_required(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _without_phantom_required(value) for key, value in node.items()}
    if isinstance(node.get("required"), list) and isinstance(node.get("properties"), dict):
        node["required"] = [name for name in node["required"] if name in node["properties"]]
    return node


@cache
def _registry() -> Registry:
    document = _without_phantom_required(_honour_nullable(json.loads(V1_SPEC.read_text())))
    return Registry().with_resource("urn:v1", Resource.from_contents(document, default_specification=DRAFT202012))


def v1_valid(instance: Any, schema: str) -> Any:
    Draft202012Validator({"$ref": f"urn:v1#/components/schemas/{schema}"}, registry=_registry()).validate(instance)
    return instance


async def v1(http: httpx2.AsyncClient, method: str, path: str, body: Any = None, status: int = 200) -> Any:
    response = await http.request(method, f"/v1{path}", headers=V1, json=body)
    assert response.status_code == status, response.text
    return response.json()


async def upload(client: openai.AsyncOpenAI, name: str, text: str) -> str:
    return (await client.files.create(file=(name, text.encode()), purpose="assistants")).id


async def test_assistant_file_ids_and_retrieval_map_onto_tool_resources(
    client: openai.AsyncOpenAI, http: httpx2.AsyncClient
) -> None:
    doc = await upload(client, "zebras.md", "# Zebras\n\nZebras sleep standing up.\n")
    created = v1_valid(
        await v1(
            http,
            "POST",
            "/assistants",
            {"model": "gpt-4", "tools": [{"type": "retrieval"}, {"type": "code_interpreter"}], "file_ids": [doc]},
        ),
        "AssistantObject",
    )
    assert created["tools"] == [{"type": "retrieval"}, {"type": "code_interpreter"}]
    assert created["file_ids"] == [doc]
    # The same assistant through a v2 client: the files are its tool resources.
    seen = await client.beta.assistants.retrieve(created["id"])
    assert [tool.type for tool in seen.tools] == ["file_search", "code_interpreter"]
    assert seen.tool_resources is not None and seen.tool_resources.code_interpreter is not None
    assert seen.tool_resources.code_interpreter.file_ids == [doc]
    assert seen.tool_resources.file_search is not None
    (store_id,) = seen.tool_resources.file_search.vector_store_ids or []
    store_files = await client.vector_stores.files.list(store_id)
    assert [item.id for item in store_files.data] == [doc]
    listed = v1_valid(await v1(http, "GET", "/assistants?limit=5"), "ListAssistantsResponse")
    assert listed["data"][0]["file_ids"] == [doc]


async def test_assistant_files_crud_keeps_the_retrieval_store_in_step(
    client: openai.AsyncOpenAI, http: httpx2.AsyncClient
) -> None:
    one, two = await upload(client, "one.txt", "first"), await upload(client, "two.txt", "second")
    assistant = await v1(http, "POST", "/assistants", {"model": "gpt-4", "tools": [{"type": "retrieval"}]})
    base = f"/assistants/{assistant['id']}/files"
    attached = v1_valid(await v1(http, "POST", base, {"file_id": one}), "AssistantFileObject")
    assert (attached["id"], attached["assistant_id"]) == (one, assistant["id"])
    await v1(http, "POST", base, {"file_id": two})
    listing = v1_valid(await v1(http, "GET", f"{base}?order=asc"), "ListAssistantFilesResponse")
    assert [item["id"] for item in listing["data"]] == [one, two]
    for bad_limit in ("0", "101", "x", "%C2%B2"):  # "²" passes str.isdigit() but not int()
        refused = await v1(http, "GET", f"{base}?limit={bad_limit}", status=400)
        assert refused["error"]["param"] == "limit"
    assert v1_valid(await v1(http, "GET", f"{base}/{two}"), "AssistantFileObject")["id"] == two
    deleted = v1_valid(await v1(http, "DELETE", f"{base}/{one}"), "DeleteAssistantFileResponse")
    assert deleted == {"id": one, "object": "assistant.file.deleted", "deleted": True}
    assert (await v1(http, "GET", f"/assistants/{assistant['id']}"))["file_ids"] == [two]
    missing = await v1(http, "GET", f"{base}/{one}", status=404)
    assert missing["error"]["message"] == f"No assistant file found with id '{one}'."
    unknown = await v1(http, "POST", base, {"file_id": "file-doesnotexist"}, status=404)
    assert "file-doesnotexist" in unknown["error"]["message"]
    # v2 sees the managed store follow the files.
    seen = await client.beta.assistants.retrieve(assistant["id"])
    assert seen.tool_resources is not None and seen.tool_resources.file_search is not None
    (store_id,) = seen.tool_resources.file_search.vector_store_ids or []
    assert [item.id for item in (await client.vector_stores.files.list(store_id)).data] == [two]


async def test_more_than_twenty_files_is_a_400_naming_file_ids(
    client: openai.AsyncOpenAI, http: httpx2.AsyncClient
) -> None:
    error = await v1(http, "POST", "/assistants", {"model": "gpt-4", "file_ids": ["file-x"] * 21}, status=400)
    assert error["error"]["param"] == "file_ids"
    assert "maximum length 20" in error["error"]["message"]


async def test_go_openai_style_modify_and_messages_with_file_ids(
    client: openai.AsyncOpenAI, http: httpx2.AsyncClient
) -> None:
    doc = await upload(client, "notes.txt", "Quarterly notes.")
    assistant = await v1(http, "POST", "/assistants", {"model": "gpt-4", "name": "Old", "tools": []})
    # go-openai v1.20 marshals unset fields as "" and null.
    modified = v1_valid(
        await v1(
            http,
            "POST",
            f"/assistants/{assistant['id']}",
            {
                "model": "",
                "name": "Renamed",
                "description": None,
                "instructions": None,
                "tools": [{"type": "code_interpreter"}],
                "file_ids": [doc],
                "metadata": None,
            },
        ),
        "AssistantObject",
    )
    assert (modified["name"], modified["model"], modified["file_ids"]) == ("Renamed", "gpt-4", [doc])
    thread = v1_valid(
        await v1(
            http,
            "POST",
            "/threads",
            {"messages": [{"role": "user", "content": "See the file.", "file_ids": [doc]}], "metadata": None},
        ),
        "ThreadObject",
    )
    messages = v1_valid(await v1(http, "GET", f"/threads/{thread['id']}/messages"), "ListMessagesResponse")
    message = v1_valid(messages["data"][0], "MessageObject")
    assert message["file_ids"] == [doc]
    files = v1_valid(
        await v1(http, "GET", f"/threads/{thread['id']}/messages/{message['id']}/files"), "ListMessageFilesResponse"
    )
    assert [item["id"] for item in files["data"]] == [doc]
    one = v1_valid(
        await v1(http, "GET", f"/threads/{thread['id']}/messages/{message['id']}/files/{doc}"), "MessageFileObject"
    )
    assert one["message_id"] == message["id"]
    added = v1_valid(
        await v1(
            http, "POST", f"/threads/{thread['id']}/messages", {"role": "user", "content": "More", "file_ids": []}
        ),
        "MessageObject",
    )
    assert added["file_ids"] == []


async def test_a_retrieval_run_in_v1_shapes_with_citations(
    client: openai.AsyncOpenAI, http: httpx2.AsyncClient
) -> None:
    doc = await upload(client, "zebras.md", "# Zebras\n\nZebras sleep standing up in the savanna.\n")
    assistant = await v1(
        http, "POST", "/assistants", {"model": "gpt-4", "tools": [{"type": "retrieval"}], "file_ids": [doc]}
    )
    seen = await client.beta.assistants.retrieve(assistant["id"])
    assert seen.tool_resources is not None and seen.tool_resources.file_search is not None
    (store_id,) = seen.tool_resources.file_search.vector_store_ids or []
    await client.vector_stores.files.poll(doc, vector_store_id=store_id, poll_interval_ms=20)
    question = '[[call file_search {"query": "how do zebras sleep"}]]'
    run = v1_valid(
        await v1(
            http,
            "POST",
            "/threads/runs",
            {"assistant_id": assistant["id"], "thread": {"messages": [{"role": "user", "content": question}]}},
        ),
        "RunObject",
    )
    assert run["file_ids"] == [doc] and run["tools"] == [{"type": "retrieval"}]
    finished = await client.beta.threads.runs.poll(run["id"], thread_id=run["thread_id"], poll_interval_ms=20)
    assert finished.status == "completed", finished.last_error
    run = v1_valid(await v1(http, "GET", f"/threads/{run['thread_id']}/runs/{run['id']}"), "RunObject")
    steps = v1_valid(
        await v1(http, "GET", f"/threads/{run['thread_id']}/runs/{run['id']}/steps?order=asc"), "ListRunStepsResponse"
    )
    calls = [
        call for step in steps["data"] if step["type"] == "tool_calls" for call in step["step_details"]["tool_calls"]
    ]
    assert [call["type"] for call in calls] == ["retrieval"] and calls[0]["retrieval"] == {}
    for step in steps["data"]:
        v1_valid(step, "RunStepObject")
    answer = (await v1(http, "GET", f"/threads/{run['thread_id']}/messages?limit=1"))["data"][0]
    v1_valid(answer, "MessageObject")
    citations = [note for note in answer["content"][0]["text"]["annotations"] if note["type"] == "file_citation"]
    assert citations and citations[0]["file_citation"] == {"file_id": doc, "quote": ""}


async def test_a_v1_stream_is_v1_event_by_event(client: openai.AsyncOpenAI, http: httpx2.AsyncClient) -> None:
    assistant = await v1(http, "POST", "/assistants", {"model": "gpt-4", "tools": [{"type": "retrieval"}]})
    thread = await v1(http, "POST", "/threads", {})
    await v1(http, "POST", f"/threads/{thread['id']}/messages", {"role": "user", "content": "Hello there"})
    response = await http.post(
        f"/v1/threads/{thread['id']}/runs", headers=V1, json={"assistant_id": assistant["id"], "stream": True}
    )
    assert response.status_code == 200
    names = []
    for frame in response.text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in frame.split("\n") if ": " in line)
        if "event" not in lines:
            continue
        names.append(lines["event"])
        if lines["data"] == "[DONE]":
            continue
        data = json.loads(lines["data"])
        schema = {"thread.run": "RunObject", "thread.message": "MessageObject", "thread.run.step": "RunStepObject"}
        if data.get("object") in schema:
            v1_valid(data, schema[data["object"]])
        if data.get("object") == "thread.run":
            assert data["tools"] == [{"type": "retrieval"}] and "file_ids" in data
    assert names[0] == "thread.run.created" and "thread.run.completed" in names and names[-1] == "done"


async def test_a_v2_client_sees_a_v1_thread_and_the_other_way_round(
    client: openai.AsyncOpenAI, http: httpx2.AsyncClient
) -> None:
    v2_assistant = await client.beta.assistants.create(model="gpt-4o", tools=[{"type": "file_search"}])
    as_v1 = v1_valid(await v1(http, "GET", f"/assistants/{v2_assistant.id}"), "AssistantObject")
    assert as_v1["tools"] == [{"type": "retrieval"}] and as_v1["file_ids"] == []
    thread = await v1(http, "POST", "/threads", {"messages": [{"role": "user", "content": "from v1"}]})
    await client.beta.threads.messages.create(thread["id"], role="user", content="from v2")
    texts = [m.content[0].text.value for m in (await client.beta.threads.messages.list(thread["id"], order="asc")).data]  # type: ignore[union-attr]
    assert texts == ["from v1", "from v2"]
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread["id"], assistant_id=v2_assistant.id)
    assert run.status == "completed"
    as_v1_run = v1_valid(await v1(http, "GET", f"/threads/{thread['id']}/runs/{run.id}"), "RunObject")
    assert as_v1_run["status"] == "completed"


async def test_a_v1_request_is_counted_under_its_route(http: httpx2.AsyncClient) -> None:
    """The v1 translation hands the route's scope on, not a copy: metrics
    and access logs label the request by its template, not "unmatched"."""
    await http.get("/v1/threads/thread_nope/runs/run_nope", headers=V1)
    await http.get("/v1/threads/thread_nope/messages", headers=V1)
    metrics = (await http.get("/metrics")).text
    counted = [
        line for line in metrics.splitlines() if line.startswith("assistants_http_requests_total{") and "404" in line
    ]
    assert any('route="/v1/threads/{thread_id}/runs/{run_id}"' in line for line in counted), counted
    assert any('route="/v1/threads/{thread_id}/messages"' in line for line in counted), counted
    assert not any('route="unmatched"' in line for line in counted), counted
