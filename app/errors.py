"""The APIError family and its rendering into OpenAI's error envelope.

Every error a client sees is ``{"error": {"message", "type", "param", "code"}}``
with OpenAI's status codes and, where known, its exact wording
(shared/reference/openai-wire-notes.md section 4). Validation failures are
400 (never 422): the SDKs retry 408/409/429/5xx, so those codes are reserved
for what really is retryable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

from app.wire.common import PARAM

JSON_PARSE_MESSAGE = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
    "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
    "sent was not valid JSON.)"
)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(object_name: str, object_id: str) -> APIError:
    """404 in OpenAI's words: ``No assistant found with id 'asst_abc'.``"""
    return APIError(404, f"No {object_name} found with id '{object_id}'.")


def file_not_found(file_id: str) -> APIError:
    return APIError(404, f"No such File object: {file_id}", param="id")


def invalid_id(param: str, value: str, expected_prefix: str) -> APIError:
    word = expected_prefix.rstrip("_-")
    return APIError(
        400,
        f"Invalid '{param}': '{value}'. Expected an ID that begins with '{word}'.",
        param=param,
    )


# A run's state forbids the request: OpenAI's 400s, word for word (wire notes
# section 4). 400 and not 409, which the SDKs would retry.


def thread_has_active_run(thread_id: str, run_id: str) -> APIError:
    return invalid(f"Thread {thread_id} already has an active run {run_id}.")


def thread_locked_for_messages(thread_id: str, run_id: str) -> APIError:
    return invalid(f"Can't add messages to {thread_id} while a run {run_id} is active.")


def cannot_cancel(status: str) -> APIError:
    return invalid(f"Cannot cancel run with status '{status}'.")


def tool_outputs_refused(status: str) -> APIError:
    return invalid(f'Runs in status "{status}" do not accept tool outputs.')


def database_unavailable() -> APIError:
    """503 (the SDKs retry it): the database stayed locked past the busy
    timeout, or the connection dropped in the middle of the request."""
    return APIError(
        503,
        "The server could not reach its database in time. Please retry your request.",
        type="server_error",
    )


def server_error() -> APIError:
    return APIError(
        500,
        "The server had an error while processing your request. Sorry about that!",
        type="server_error",
    )


# --- translating pydantic validation errors -------------------------------

_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a decimal",
    "float_parsing": "a decimal",
    "bool_type": "a boolean",
    "bool_parsing": "a boolean",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "list_type": "an array",
    "tuple_type": "an array",
}


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, Sequence):
        return "an array"
    return "an unknown type"


_ABSENT_KEY_KINDS = ("missing", "extra_forbidden")


def _param_parts(loc: Sequence[Any], body: Any, kind: str = "") -> list[str]:
    """The parts of a pydantic location that name something in the request.

    Pydantic puts union member names and discriminator tags into locations;
    those do not exist in the request, so only parts that navigate the
    actual input are kept, plus the final key of a missing or unknown
    parameter (absent from the input, yet it is the parameter).
    """
    if loc and loc[0] in ("query", "path", "header"):
        return [str(part) for part in loc[1:2]]
    parts: list[str] = []
    current = body
    for index, part in enumerate(loc):
        if index == 0 and part == "body":
            continue
        if isinstance(part, int) and isinstance(current, list) and 0 <= part < len(current):
            parts.append(f"[{part}]")
            current = current[part]
        elif isinstance(part, str) and isinstance(current, Mapping) and part in current:
            parts.append(part)
            current = current[part]
        elif kind in _ABSENT_KEY_KINDS and index == len(loc) - 1 and isinstance(current, Mapping):
            parts.append(str(part))
        # anything else is a union member or tag name: skip it
    return parts


def _param_path(error: Mapping[str, Any], body: Any) -> str:
    """OpenAI's ``messages[0].content`` form of an error's location."""
    return _join_param(*_param_parts(list(error.get("loc", ())), body, str(error.get("type", ""))))


def _join_param(*parts: str) -> str:
    path = ""
    for part in parts:
        if part.startswith("["):
            path += part
        elif part:
            part = part.lstrip(".")
            path = f"{path}.{part}" if path else part
    return path


def _quote_list(values: Sequence[str]) -> str:
    quoted = [f"'{value}'" for value in values]
    if len(quoted) <= 1:
        return "".join(quoted)
    if len(quoted) == 2:
        return f"{quoted[0]} and {quoted[1]}"
    return ", ".join(quoted[:-1]) + f", and {quoted[-1]}"


def _expected_values(ctx: Mapping[str, Any]) -> list[str]:
    raw = str(ctx.get("expected") or ctx.get("expected_tags") or "")
    raw = raw.replace(" or ", ", ")
    return [item.strip().strip("'\"") for item in raw.split(",") if item.strip()]


def _number_error(kind: str, ctx: Mapping[str, Any], value: Any, param: str) -> APIError:
    if isinstance(value, str):  # query parameters arrive as text
        try:
            value = int(value)
        except ValueError:
            with contextlib.suppress(ValueError):
                value = float(value)
    is_int = isinstance(value, int) and not isinstance(value, bool)
    noun = "integer" if is_int else "decimal"
    if kind in ("less_than_equal", "less_than"):
        bound, op, side = ctx.get("le", ctx.get("lt")), "<=" if kind == "less_than_equal" else "<", "above"
        limit = "maximum"
    else:
        bound, op, side = ctx.get("ge", ctx.get("gt")), ">=" if kind == "greater_than_equal" else ">", "below"
        limit = "minimum"
    return invalid(
        f"Invalid '{param}': {noun} {side} {limit} value. Expected a value {op} {bound}, but got {value} instead.",
        param=param,
        code=f"{noun}_{side}_{'max' if side == 'above' else 'min'}_value",
    )


def _discriminator(ctx: Mapping[str, Any]) -> str:
    return str(ctx.get("discriminator", "type")).strip("'")


def _type_error(kind: str, value: Any, param: str) -> APIError:
    if not param:
        # The body itself is not an object. FastAPI hands non-JSON content
        # types over as raw bytes: to us that is a body that is not JSON.
        if isinstance(value, (bytes, bytearray)):
            return invalid(JSON_PARSE_MESSAGE)
        return invalid(f"Invalid type: expected an object, but got {_describe(value)} instead.", code="invalid_type")
    return invalid(
        f"Invalid type for '{param}': expected {_EXPECTED[kind]}, but got {_describe(value)} instead.",
        param=param,
        code="invalid_type",
    )


def _length_error(kind: str, ctx: Mapping[str, Any], value: Any, param: str) -> APIError:
    longer = kind.endswith("too_long")
    noun = "string" if kind.startswith("string") else "array"
    bound = ctx.get("max_length" if longer else "min_length")
    if noun == "string":
        actual: Any = len(value) if isinstance(value, str) else "?"
    else:
        actual = ctx.get("actual_length", len(value) if isinstance(value, Sequence) else "?")
        if actual == 0:
            return invalid(
                f"Invalid '{param}': empty array. Expected an array with minimum length {bound}, "
                "but got an empty array instead.",
                param=param,
                code="empty_array",
            )
    return invalid(
        f"Invalid '{param}': {noun} too {'long' if longer else 'short'}. Expected a {noun} with "
        f"{'maximum' if longer else 'minimum'} length {bound}, but got a {noun} with length "
        f"{actual} instead.",
        param=param,
        code=f"{noun}_{'above_max' if longer else 'below_min'}_length",
    )


def _value_error(kind: str, ctx: Mapping[str, Any], value: Any, param: str) -> APIError:
    if kind == "union_tag_invalid":
        value = ctx.get("tag", value)
        param = _join_param(param, _discriminator(ctx))
    return invalid(
        f"Invalid value: '{value}'. Supported values are: {_quote_list(_expected_values(ctx))}.",
        param=param,
        code="invalid_value",
    )


def _custom_error(error: Mapping[str, Any], ctx: Mapping[str, Any], param: str) -> APIError:
    kind = str(error.get("type", ""))
    message = str(error.get("msg", "Invalid request."))
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if PARAM in message:
        # PARAM stands for the full parameter: where the error was raised
        # plus the suffix the validator named (see app.wire.common.custom_error).
        param = _join_param(param, str(ctx.get("param_suffix", "")))
        return invalid(message.replace(PARAM, param), param=param or None, code=kind if kind != "value_error" else None)
    return invalid(f"Invalid '{param}': {message}", param=param or None, code="invalid_value")


def _one(error: Mapping[str, Any], body: Any) -> APIError:
    kind = str(error.get("type", ""))
    ctx: Mapping[str, Any] = error.get("ctx") or {}
    value = error.get("input")
    param = _param_path(error, body)
    if kind == "json_invalid":
        return invalid(JSON_PARSE_MESSAGE)
    if kind in ("missing", "union_tag_not_found"):
        if kind == "union_tag_not_found":
            param = _join_param(param, _discriminator(ctx))
        if not param:
            return invalid(JSON_PARSE_MESSAGE)
        return invalid(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if kind == "extra_forbidden":
        return invalid(f"Unknown parameter: '{param}'.", param=param, code="unknown_parameter")
    if kind in _EXPECTED:
        return _type_error(kind, value, param)
    if kind in ("string_too_long", "string_too_short", "too_long", "too_short"):
        return _length_error(kind, ctx, value, param)
    if kind in ("less_than_equal", "less_than", "greater_than_equal", "greater_than"):
        return _number_error(kind, ctx, value, param)
    if kind in ("literal_error", "enum", "union_tag_invalid"):
        return _value_error(kind, ctx, value, param)
    return _custom_error(error, ctx, param)


# --- choosing among the errors of a union ---------------------------------


def _is_type_mismatch(error: Mapping[str, Any]) -> bool:
    """The input is not even of the member's type (every Literal we use is a
    string literal, so a non-string input fails a literal on type)."""
    kind = error.get("type")
    return kind in _EXPECTED or (kind == "literal_error" and not isinstance(error.get("input"), str))


def _member_noun(error: Mapping[str, Any]) -> str:
    kind = str(error.get("type"))
    if kind == "list_type":
        member = str(list(error.get("loc", ("",)))[-1])
        items = member[len("list[") : -1] if member.startswith("list[") else ""
        return "array of objects" if items and items not in ("str", "int", "float", "bool") else "an array"
    if kind == "literal_error":
        return "a string"
    return _EXPECTED.get(kind, "a value")


def _union_type_error(errors: Sequence[Mapping[str, Any]], param: str) -> APIError:
    """OpenAI's wording when a value matches none of a union's types:
    ``expected one of a string or array of objects, but got an object instead``."""
    nouns: list[str] = []
    for error in errors:
        noun = _member_noun(error)
        if nouns:
            noun = noun.removeprefix("an ").removeprefix("a ")
        if noun not in nouns:
            nouns.append(noun)
    return invalid(
        f"Invalid type for '{param}': expected one of {' or '.join(nouns)}, but got "
        f"{_describe(errors[0].get('input'))} instead.",
        param=param,
        code="invalid_type",
    )


def from_validation_errors(errors: Sequence[Mapping[str, Any]], body: Any = None) -> APIError:
    """The one error to report for a failed validation.

    A value that fails a union yields one error per member. The member that
    got furthest into the input explains the problem best; among equally deep
    ones, a member whose type did not even match explains it worst; when no
    member's type matched, the value gets a union type error.
    """
    if not errors:
        return invalid("Invalid request.")

    def depth(error: Mapping[str, Any]) -> int:
        return len(_param_parts(list(error.get("loc", ())), body, str(error.get("type", ""))))

    def param(error: Mapping[str, Any]) -> str:
        return _param_path(error, body)

    deepest = max(errors, key=depth)
    candidates = [error for error in errors if param(error) == param(deepest)]
    matching = [error for error in candidates if not _is_type_mismatch(error)]
    if matching:
        return _one(matching[0], body)
    if len(candidates) > 1 and param(deepest):
        return _union_type_error(candidates, param(deepest))
    return _one(deepest, body)
