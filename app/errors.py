"""The APIError family and its rendering into OpenAI's error envelope.

Every error a client sees is ``{"error": {"message", "type", "param", "code"}}``
with OpenAI's status codes and, where known, its exact wording
(shared/reference/openai-wire-notes.md section 4). Validation failures are
400 (never 422): the SDKs retry 408/409/429/5xx, so those codes are reserved
for what really is retryable.
"""

from __future__ import annotations

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


def _param_path(loc: Sequence[Any], body: Any) -> str:
    """Turn a pydantic location into OpenAI's ``messages[0].content`` form.

    Pydantic puts union member names and discriminator tags into locations;
    those do not exist in the request, so only parts that navigate the
    actual input are kept.
    """
    parts: list[str] = []
    current = body
    for index, part in enumerate(loc):
        if index == 0 and part in ("body", "query", "path", "header"):
            continue
        if isinstance(part, int) and isinstance(current, list) and 0 <= part < len(current):
            parts.append(f"[{part}]")
            current = current[part]
        elif isinstance(part, str) and isinstance(current, Mapping) and part in current:
            parts.append(("." if parts else "") + part)
            current = current[part]
        elif isinstance(part, str) and index == len(loc) - 1:
            # a missing or unknown key: it is not in the input, but it is the parameter
            parts.append(("." if parts else "") + part)
        # anything else is a union member or tag name: skip it
    return "".join(parts)


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
            try:
                value = float(value)
            except ValueError:
                pass
    is_int = isinstance(value, int) and not isinstance(value, bool)
    noun = "integer" if is_int else "decimal"
    if kind in ("less_than_equal", "less_than"):
        bound, op, side = ctx.get("le", ctx.get("lt")), "<=" if kind == "less_than_equal" else "<", "above"
        limit = "maximum"
    else:
        bound, op, side = ctx.get("ge", ctx.get("gt")), ">=" if kind == "greater_than_equal" else ">", "below"
        limit = "minimum"
    return invalid(
        f"Invalid '{param}': {noun} {side} {limit} value. Expected a value {op} {bound}, "
        f"but got {value} instead.",
        param=param,
        code=f"{noun}_{side}_{'max' if side == 'above' else 'min'}_value",
    )


def _discriminator(ctx: Mapping[str, Any]) -> str:
    return str(ctx.get("discriminator", "type")).strip("'")


def _one(error: Mapping[str, Any], body: Any) -> APIError:
    kind = str(error.get("type", ""))
    loc = list(error.get("loc", ()))
    ctx: Mapping[str, Any] = error.get("ctx") or {}
    value = error.get("input")
    param = _param_path(loc, body)
    if kind == "json_invalid":
        return invalid(JSON_PARSE_MESSAGE)
    if kind in ("missing", "union_tag_not_found"):
        if kind == "union_tag_not_found":
            param = f"{param}.{_discriminator(ctx)}".lstrip(".")
        if not param:
            return invalid(JSON_PARSE_MESSAGE)
        return invalid(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    if kind == "extra_forbidden":
        return invalid(f"Unknown parameter: '{param}'.", param=param, code="unknown_parameter")
    if kind in _EXPECTED:
        return invalid(
            f"Invalid type for '{param}': expected {_EXPECTED[kind]}, but got {_describe(value)} instead.",
            param=param,
            code="invalid_type",
        )
    if kind in ("string_too_long", "string_too_short"):
        longer = kind == "string_too_long"
        bound = ctx.get("max_length" if longer else "min_length")
        return invalid(
            f"Invalid '{param}': string too {'long' if longer else 'short'}. Expected a string with "
            f"{'maximum' if longer else 'minimum'} length {bound}, but got a string with length "
            f"{len(value) if isinstance(value, str) else '?'} instead.",
            param=param,
            code=f"string_{'above_max' if longer else 'below_min'}_length",
        )
    if kind in ("too_long", "too_short"):
        longer = kind == "too_long"
        bound = ctx.get("max_length" if longer else "min_length")
        actual = ctx.get("actual_length", len(value) if isinstance(value, Sequence) else "?")
        return invalid(
            f"Invalid '{param}': array too {'long' if longer else 'short'}. Expected an array with "
            f"{'maximum' if longer else 'minimum'} length {bound}, but got an array with length "
            f"{actual} instead.",
            param=param,
            code=f"array_{'above_max' if longer else 'below_min'}_length",
        )
    if kind in ("less_than_equal", "less_than", "greater_than_equal", "greater_than"):
        return _number_error(kind, ctx, value, param)
    if kind in ("literal_error", "enum", "union_tag_invalid"):
        if kind == "union_tag_invalid":
            value = ctx.get("tag", value)
            param = f"{param}.{_discriminator(ctx)}".lstrip(".")
        return invalid(
            f"Invalid value: '{value}'. Supported values are: {_quote_list(_expected_values(ctx))}.",
            param=param,
            code="invalid_value",
        )
    message = str(error.get("msg", "Invalid request."))
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if PARAM in message:
        message = message.replace(PARAM, param)
        param += str(ctx.get("param_suffix", ""))
        return invalid(message, param=param, code=kind if kind != "value_error" else None)
    return invalid(f"Invalid '{param}': {message}", param=param or None, code="invalid_value")


def from_validation_errors(errors: Sequence[Mapping[str, Any]], body: Any = None) -> APIError:
    """The one error to report for a failed validation.

    A value that fails a union yields one error per member; the deepest one
    (the member that got furthest) is the most useful to report.
    """
    if not errors:
        return invalid("Invalid request.")

    def depth(error: Mapping[str, Any]) -> int:
        return len(_param_path(list(error.get("loc", ())), body))

    best = max(errors, key=depth)
    return _one(best, body)
