"""Validate JSON against the official OpenAPI schemas (vendored in tests/openapi)."""

from __future__ import annotations

import base64
import json
import re
import struct
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).resolve().parent / "openapi" / "assistants-v2.openapi.json"
_SPEC_URI = "urn:openai-openapi"


def _honour_nullable(node: Any) -> Any:
    """The spec is OpenAPI 3.1 but some schemas still use 3.0's
    ``nullable: true``, which JSON Schema ignores: turn it into a null branch."""
    if isinstance(node, list):
        return [_honour_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _honour_nullable(value) for key, value in node.items()}
    if node.pop("nullable", False) is True:
        return {"anyOf": [node, {"type": "null"}]}
    return node


@cache
def spec() -> dict[str, Any]:
    data: dict[str, Any] = _honour_nullable(json.loads(SPEC_PATH.read_text()))
    return data


@cache
def _registry() -> Registry:
    resource = Resource.from_contents(spec(), default_specification=DRAFT202012)
    return Registry().with_resource(_SPEC_URI, resource)


def _validator(schema: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator(
        {"$ref": f"{_SPEC_URI}#{schema['$ref'][1:]}"} if "$ref" in schema else schema, registry=_registry()
    )


def validate(instance: Any, schema_name: str) -> None:
    """Raise jsonschema.ValidationError unless instance matches the named schema."""
    _validator({"$ref": f"#/components/schemas/{schema_name}"}).validate(instance)


@cache
def _path_patterns() -> list[tuple[re.Pattern[str], str]]:
    patterns = []
    for template in spec()["paths"]:
        regex = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        patterns.append((re.compile(regex), template))
    return patterns


def response_schema(method: str, path: str, status: int) -> dict[str, Any] | None:
    """The spec's JSON schema for this operation's response, if it has one."""
    for pattern, template in _path_patterns():
        if pattern.match(path):
            operation = spec()["paths"][template].get(method.lower())
            if operation is None:
                return None
            response = operation["responses"].get(str(status))
            if response is None:
                return None
            content = response.get("content", {}).get("application/json")
            return content["schema"] if content else None
    return None


def validate_response(method: str, path: str, status: int, body: Any) -> None:
    if status >= 400:
        validate(body, "ErrorResponse")
        return
    schema = response_schema(method, path, status)
    if isinstance(body, dict) and body.get("object") == "list" and not body.get("data"):
        # The spec types first_id/last_id as strings, but OpenAI sends null on
        # an empty page (and the SDKs, go-openai's *string included, expect it).
        assert body.get("first_id") is None and body.get("last_id") is None
        body = {**body, "first_id": "", "last_id": ""}
    if isinstance(body, dict) and any(
        isinstance(item, dict) and item.get("object") == "embedding" for item in body.get("data") or []
    ):
        body = _floats_for_base64(body)
    if schema is not None:
        _validator(schema).validate(body)


def _floats_for_base64(body: dict[str, Any]) -> dict[str, Any]:
    """The spec types an embedding as an array of floats, but with
    ``encoding_format: base64`` (the SDKs' default) OpenAI sends a base64
    string of little-endian float32: check the decoded floats."""
    data = []
    for item in body["data"]:
        if isinstance(item.get("embedding"), str):
            raw = base64.b64decode(item["embedding"], validate=True)
            item = {**item, "embedding": list(struct.unpack(f"<{len(raw) // 4}f", raw))}
        data.append(item)
    return {**body, "data": data}
