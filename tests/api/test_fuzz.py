"""Property-based requests over the vendored OpenAPI document (issue 15):
bodies drawn from each operation's request schema, some of them broken on
purpose (a wrong type, an unknown parameter). Whatever arrives, the server
never answers 5xx, every error is OpenAI's envelope, and a body the schema
refuses is refused (4xx), never stored.

Run creation is left out: a valid body there starts a model call each time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests import oas

pytestmark = pytest.mark.timeout(120)

BETA = {"OpenAI-Beta": "assistants=v2"}
# Operations with a JSON body (path template -> request schema), run creation aside.
OPERATIONS = {
    "/assistants": "CreateAssistantRequest",
    "/assistants/{assistant_id}": "ModifyAssistantRequest",
    "/threads": "CreateThreadRequest",
    "/threads/{thread_id}": "ModifyThreadRequest",
    "/threads/{thread_id}/messages": "CreateMessageRequest",
    "/threads/{thread_id}/messages/{message_id}": "ModifyMessageRequest",
    "/vector_stores": "CreateVectorStoreRequest",
    "/vector_stores/{vector_store_id}": "UpdateVectorStoreRequest",
    "/vector_stores/{vector_store_id}/files": "CreateVectorStoreFileRequest",
    "/vector_stores/{vector_store_id}/file_batches": "CreateVectorStoreFileBatchRequest",
    "/vector_stores/{vector_store_id}/search": "VectorStoreSearchRequest",
}
MAX_DEPTH = 5
UNKNOWN = "not_a_parameter"


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = oas.spec()
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def _any_json() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False, allow_infinity=False)
    )
    return st.one_of(
        scalars,
        st.text(max_size=8),
        st.lists(scalars, max_size=2),
        st.dictionaries(st.text(max_size=4), scalars, max_size=2),
    )


def from_schema(schema: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values shaped by a JSON schema (close to valid; the test does not
    assume validity, it asks the schema)."""
    schema = _resolve(schema)
    if depth > MAX_DEPTH:
        return _any_json()
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([from_schema(option, depth + 1) for option in schema[key]])
    if "allOf" in schema:
        return from_schema(schema["allOf"][0], depth + 1)
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([from_schema({**schema, "type": one}, depth) for one in kind])
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(schema.get("minimum", -1000), schema.get("maximum", 100_000))
    if kind == "number":
        low, high = schema.get("minimum", -10.0), schema.get("maximum", 1000.0)
        return st.floats(low, high, allow_nan=False, allow_infinity=False)
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 24), 24))
    if kind == "array":
        items = from_schema(schema.get("items", {}), depth + 1)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 3), 3))
    if kind == "object" or "properties" in schema:
        return _object(schema, depth)
    return _any_json()


def _object(schema: dict[str, Any], depth: int) -> st.SearchStrategy[dict[str, Any]]:
    properties = schema.get("properties", {})
    required = [name for name in schema.get("required", []) if name in properties]
    optional = [name for name in properties if name not in required]
    if not properties:
        extra = schema.get("additionalProperties")
        values = from_schema(extra, depth + 1) if isinstance(extra, dict) else _any_json()
        return st.dictionaries(st.text(min_size=1, max_size=8), values, max_size=3)
    fixed = st.fixed_dictionaries(
        {name: from_schema(properties[name], depth + 1) for name in required},
        optional={name: from_schema(properties[name], depth + 1) for name in optional},
    )
    return fixed


@st.composite
def request(draw: st.DrawFn) -> tuple[str, dict[str, Any], str]:
    """(operation, body, how it was broken: '' | 'type' | 'unknown')."""
    path = draw(st.sampled_from(sorted(OPERATIONS)))
    body = draw(_object(_resolve({"$ref": f"#/components/schemas/{OPERATIONS[path]}"}), 0))
    broken = draw(st.sampled_from(["", "", "type", "unknown"]))
    if broken == "unknown":
        body[UNKNOWN] = draw(_any_json())
    elif broken == "type" and body:
        body[draw(st.sampled_from(sorted(body)))] = draw(_any_json())
    return path, body, broken


@pytest.fixture
def api(settings: Settings) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """The in-process app, and one real object for every id a path takes."""
    with TestClient(create_app(settings)) as client:
        ids = {
            "assistant_id": client.post("/v1/assistants", json={"model": "gpt-4o"}, headers=BETA).json()["id"],
            "thread_id": client.post("/v1/threads", json={}, headers=BETA).json()["id"],
            "vector_store_id": client.post("/v1/vector_stores", json={}, headers=BETA).json()["id"],
        }
        message = client.post(
            f"/v1/threads/{ids['thread_id']}/messages", json={"role": "user", "content": "hi"}, headers=BETA
        )
        ids["message_id"] = message.json()["id"]
        yield client, ids


def test_no_body_makes_a_5xx_and_invalid_bodies_are_refused(api: tuple[TestClient, dict[str, str]]) -> None:
    client, ids = api

    @settings(
        max_examples=250,
        deadline=None,
        database=None,  # nothing written into the repository
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(request())
    def check(drawn: tuple[str, dict[str, Any], str]) -> None:
        template, body, broken = drawn
        response = client.post("/v1" + template.format(**ids), json=body, headers=BETA)
        assert response.status_code < 500, (template, body, response.text)
        if response.status_code >= 400:
            oas.validate(response.json(), "ErrorResponse")
        schema_refuses = not _valid(body, OPERATIONS[template])
        if broken == "unknown" or schema_refuses:
            assert 400 <= response.status_code < 500, (template, body, response.text)

    check()


def _without_nulls(value: Any) -> Any:
    """An explicit null for an optional parameter means "not given" here (as
    SDKs that serialise unset fields send it); the spec has no null there."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _valid(body: dict[str, Any], schema_name: str) -> bool:
    try:
        oas.validate(_without_nulls(body), schema_name)
    except jsonschema.ValidationError:
        return False
    return True
