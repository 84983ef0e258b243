"""``anthropic/`` routes: which can be served over Anthropic's Messages API
without litellm, and the request litellm 1.100 would send for a ChatRequest.

Read off litellm's own Anthropic translation (its AnthropicConfig, the
anthropic_messages_pt message conversion and its parameter handling), for
the requests this server makes; tests/runner/test_anthropic_direct.py sends
each through both and requires the same body and headers. What it does not
translate stays on litellm: a route whose litellm_params it does not know
(``route_refusal``, decided at start-up), or one request whose shape it does
not (``request_refusal``: images by http:// URL, which litellm downloads,
a response_format with a schema, reasoning_effort, cache_control, thinking blocks, documents,
tools other than functions or with names litellm rewrites, ...).

litellm's quirks kept because they are what it sends: an empty or blank user
or assistant text becomes its placeholder sentence; consecutive user-side
messages (tool results included) merge into one user turn, assistant turns
likewise; tool_choice always carries ``disable_parallel_tool_use`` when the
request has tools; a request parameter the user set that litellm does not
translate (``seed``, ``frequency_penalty``, ..., a response_format
json_object, temperature and top_p on a model without sampling) is sent under its OpenAI name, as litellm's
``allowed_openai_params`` forwards it (litellm_adapter._untranslated), so
Anthropic's 400 names it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from app.llm import model_map
from app.llm.interface import ChatRequest, explicit_params

PREFIX = "anthropic/"
ANTHROPIC_VERSION = "2023-06-01"  # the anthropic-version litellm sends
_DEFAULT_BASE = "https://api.anthropic.com/v1/messages"
_PATH = "/v1/messages"
_BASE_VARIABLES = ("ANTHROPIC_API_BASE", "ANTHROPIC_BASE_URL")
_OAUTH_PREFIX = "sk-ant-oat"  # Claude subscription tokens: Bearer, and a beta header
_OAUTH_BETA = "oauth-2025-04-20"
# litellm's max_tokens when neither the request, the route nor its model map sets one.
_FALLBACK_MAX_TOKENS = 4096
_FALLBACK_MAX_TOKENS_VARIABLE = "DEFAULT_ANTHROPIC_CHAT_MAX_TOKENS"
# The placeholder litellm puts in place of an empty user or assistant text (Anthropic refuses empty text).
EMPTY_TEXT = "[System: Empty message content sanitised to satisfy protocol]"
_JSON_TOOL = "json_tool_call"  # the tool litellm's JSON mode turns into text
_DUMMY_TOOL = {
    "name": "dummy_tool",
    "input_schema": {"type": "object", "properties": {}},
    "type": "custom",
    "description": "This is a dummy tool call",
}
# Anthropic's tool names; litellm rewrites others (and maps them back), which stays litellm's.
_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,128}")
_TOOL_ID_INVALID = re.compile(r"[^a-zA-Z0-9_-]")
# The input_schema keys litellm keeps (its AnthropicInputSchema); the rest it drops.
_SCHEMA_KEYS = ("type", "properties", "additionalProperties", "required", "$defs", "strict")
# Model names without sampling parameters, when the model map has no flag (litellm's list).
_NO_SAMPLING_MARKERS: tuple[str, ...] = ("fable", "opus-4-7", "opus_4_7", "opus-4.7", "opus_4.7")
_NO_SAMPLING_MARKERS += ("opus-4-8", "opus_4_8", "opus-4.8", "opus_4.8")

# Route parameters understood here; the router's own keys come from the caller.
CONNECTION_KEYS = frozenset({"model", "api_base", "api_key", "timeout", "max_retries", "extra_headers", "drop_params"})
BODY_KEYS = frozenset({"temperature", "top_p", "max_tokens", "stop"})
# The OpenAI parameters litellm 1.100 translates for Anthropic (its
# AnthropicConfig.get_supported_openai_params); the user's others are sent as they are.
_TRANSLATED = frozenset(
    {"stop", "temperature", "top_p", "max_tokens", "max_completion_tokens", "tools", "tool_choice"}
    | {"parallel_tool_calls", "response_format", "user", "web_search_options", "speed", "context_management"}
    | {"cache_control", "thinking", "reasoning_effort", "stream", "extra_headers"}
)
# Headers litellm sets itself over a route's extra_headers, or merges (anthropic-beta).
_OWN_HEADERS = ("x-api-key", "authorization", "content-type", "accept")


@dataclass(frozen=True)
class Request:
    """One Messages call as litellm would send it."""

    url: str
    headers: dict[str, str]
    body: dict[str, Any]


def route_refusal(params: Mapping[str, Any], extra_keys: frozenset[str] = frozenset()) -> str | None:
    """Why an ``anthropic/`` route's litellm_params need litellm; None if they do not."""
    unknown = sorted(set(params) - CONNECTION_KEYS - BODY_KEYS - extra_keys)
    if unknown:
        return f"litellm_params {', '.join(unknown)} need litellm"
    if params.get("drop_params") is False:
        return "drop_params: false (litellm then refuses what it would drop)"
    headers = params.get("extra_headers") or {}
    if not isinstance(headers, Mapping):
        return "extra_headers is not a mapping"
    own = sorted(str(name) for name in headers if _litellm_sets(str(name)))
    if own:
        return f"extra_headers {', '.join(own)}: litellm sets or merges them itself"
    base = params.get("api_base")
    if isinstance(base, str) and ("?" in base or "#" in base):
        return "its api_base has a query string or fragment"
    stop = params.get("stop")
    if stop is not None and not _stop_values(stop):
        return "its stop is neither a string nor a list of strings"
    if isinstance(params.get("max_tokens"), bool) or not isinstance(params.get("max_tokens", 0), int):
        return "its max_tokens is not a whole number"
    return None


def _litellm_sets(name: str) -> bool:
    lowered = name.lower()
    return lowered in _OWN_HEADERS or lowered.startswith("anthropic-")


def request_refusal(request: ChatRequest) -> str | None:
    """Why this request goes through litellm although its route is direct; None if it need not."""
    if request.response_format is not None and not _schemaless(request.response_format, request.tools):
        return "response_format"  # a schema: litellm asks for it by a tool, or by output_format per model
    if request.reasoning_effort is not None:
        return "reasoning_effort"
    if "user" in request.extra:
        return "user"  # metadata.user_id, unless it looks like an e-mail or phone number
    stop = request.extra.get("stop")
    if stop is not None and not _stop_values(stop):
        return "stop"
    if request.max_tokens is not None and (
        isinstance(request.max_tokens, bool) or not isinstance(request.max_tokens, int)
    ):
        return "max_tokens"
    for tool in request.tools:
        why = _tool_refusal(tool)
        if why:
            return why
    if not any(message.get("role") != "system" for message in request.messages):
        return "no message but system ones"  # litellm's own error
    for message in request.messages:
        why = _message_refusal(message)
        if why:
            return why
    return None


def _schemaless(response_format: dict[str, Any], tools: list[dict[str, Any]]) -> bool:
    """A response_format litellm sends no translation for (text, json_object:
    no schema), only the parameter itself, the user having set it. Its JSON
    mode then reads a tool named json_tool_call as the answer: such a request
    stays litellm's."""
    if set(response_format) != {"type"} or response_format["type"] not in ("text", "json_object"):
        return False
    return not any((tool.get("function") or {}).get("name") == _JSON_TOOL for tool in tools)


def _stop_values(stop: Any) -> bool:
    return isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(item, str) for item in stop))


def _tool_refusal(tool: Any) -> str | None:
    if not isinstance(tool, dict) or tool.get("type") != "function" or set(tool) - {"type", "function"}:
        return "a tool other than a plain function"
    function = tool.get("function")
    if not isinstance(function, dict) or set(function) - {"name", "description", "parameters", "strict"}:
        return "a function tool with keys litellm translates"
    if not isinstance(function.get("name"), str) or not _TOOL_NAME.fullmatch(function["name"]):
        return "a tool name litellm rewrites"
    schema = function.get("parameters")
    if schema is not None and not isinstance(schema, dict):
        return "tool parameters that are not a schema"
    if isinstance(schema, dict) and ("definitions" in schema or isinstance(schema.get("components"), dict)):
        return "a tool schema with definitions litellm inlines"
    return None


_MESSAGE_KEYS = {
    "system": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    "assistant": {"role", "content", "name", "tool_calls"},
    "tool": {"role", "content", "tool_call_id", "name"},
}


def _message_refusal(message: Any) -> str | None:
    if not isinstance(message, dict) or message.get("role") not in _MESSAGE_KEYS:
        return "a message role other than system, user, assistant or tool"
    role = message["role"]
    if set(message) - _MESSAGE_KEYS[role]:
        return f"a {role} message with keys litellm translates"
    content = message.get("content")
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        return "a tool message without tool_call_id"
    if isinstance(content, list):
        allowed = {"user": ("text", "image_url")}.get(role, ("text",))
        for part in content:
            why = _part_refusal(part, allowed)
            if why:
                return why
    elif content is not None and not isinstance(content, str):
        return f"{role} content that is neither text nor parts"
    elif content is None and role != "assistant":
        return f"a {role} message without content"
    for call in message.get("tool_calls") or []:
        if not isinstance(call, dict) or set(call) - {"id", "type", "function", "index"}:
            return "a tool call litellm translates"
        function = call.get("function")
        if call.get("type") != "function" or not isinstance(call.get("id"), str) or not isinstance(function, dict):
            return "a tool call that is not a function's"
        if call["id"].startswith("srvtoolu_") or not isinstance(function.get("name"), str):
            return "a server tool's call"
        if _arguments(function.get("arguments")) is None:
            return "tool call arguments that are not JSON (litellm repairs them)"
    return None


def _part_refusal(part: Any, allowed: tuple[str, ...]) -> str | None:
    if not isinstance(part, dict) or part.get("type") not in allowed:
        return "a content part other than text or an image"
    if part["type"] == "text":
        return None if set(part) <= {"type", "text"} and isinstance(part.get("text"), str) else "a text part"
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if set(part) - {"type", "image_url"} or (isinstance(image, dict) and set(image) - {"url", "detail", "format"}):
        return "an image part with keys litellm translates"
    if not isinstance(url, str) or not (url.startswith("https://") or _data_url(url) is not None):
        return "an image litellm downloads (http://) or cannot read"
    return None


def _data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 data) of a ``data:...;base64,...`` URL, split as litellm splits it."""
    if url.startswith("http") or url.count("data:") != 1 or url.count(";base64,") != 1:
        return None
    media_type, data = url.split("data:")[1].split(";base64,")
    return media_type.replace("\\/", "/"), data


def _arguments(arguments: Any) -> Any:
    """A tool call's input as litellm parses it ({} for none); None where it would repair or fail."""
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    if not isinstance(arguments, str):
        return None
    try:
        return json.loads(arguments)
    except ValueError:
        return None


def build(params: Mapping[str, Any], request: ChatRequest) -> Request:
    """The URL, headers and body litellm sends for this request on a route
    (resolved litellm_params); ``request_refusal`` said it can be sent."""
    model = str(params["model"])[len(PREFIX) :]
    return Request(_url(params), _headers(params), _body(model, params, request))


def _url(params: Mapping[str, Any]) -> str:
    base = str(params.get("api_base") or next(filter(None, map(os.environ.get, _BASE_VARIABLES)), _DEFAULT_BASE))
    if _truthy(os.environ.get("LITELLM_ANTHROPIC_DISABLE_URL_SUFFIX")) or base.endswith(_PATH):
        return base
    return base + _PATH  # as litellm appends it: a trailing slash stays


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("true", "1", "yes", "on")


def _headers(params: Mapping[str, Any]) -> dict[str, str]:
    headers = {str(name): str(value) for name, value in (params.get("extra_headers") or {}).items()}
    headers.update({"anthropic-version": ANTHROPIC_VERSION, "accept": "application/json"})
    headers["content-type"] = "application/json"
    key = params.get("api_key") or os.environ.get("ANTHROPIC_API_KEY")
    if key and str(key).startswith(_OAUTH_PREFIX):
        headers.update(
            {
                "authorization": f"Bearer {key}",
                "anthropic-dangerous-direct-browser-access": "true",
                "anthropic-beta": _OAUTH_BETA,
            }
        )
    elif key:
        headers["x-api-key"] = str(key)
    elif os.environ.get("ANTHROPIC_AUTH_TOKEN"):
        headers["authorization"] = f"Bearer {os.environ['ANTHROPIC_AUTH_TOKEN']}"
    else:
        raise MissingKey
    return headers


class MissingKey(Exception):
    """No key for the route: litellm fails before sending anything."""

    message = (
        "Missing Anthropic API Key - A call is being made to anthropic but no key is set either in the "
        "environment variables or via params. Please set `ANTHROPIC_API_KEY` or `ANTHROPIC_AUTH_TOKEN` "
        "in your environment vars"
    )


def _body(model: str, params: Mapping[str, Any], request: ChatRequest) -> dict[str, Any]:
    # What litellm receives: the route's parameters under the request's.
    given: dict[str, Any] = {name: params[name] for name in BODY_KEYS if params.get(name) is not None}
    for name in ("temperature", "top_p", "max_tokens"):
        if getattr(request, name) is not None:
            given[name] = getattr(request, name)
    given.update(request.extra)
    body: dict[str, Any] = {"model": model, "messages": []}
    if "max_tokens" in given:
        body["max_tokens"] = given["max_tokens"]
    if request.tools:
        body["tools"] = [_tool(tool) for tool in request.tools]
        body["tool_choice"] = _tool_choice(request.tool_choice, request.parallel_tool_calls)
    stop = given.get("stop")
    if stop is not None:
        sequences = [stop] if isinstance(stop, str) else list(stop)
        if sequences:
            body["stop_sequences"] = sequences
    sampling = _samples(model)
    for name in ("temperature", "top_p"):
        if name in given and (sampling or (name == "temperature" and given[name] == 1)):
            body[name] = given[name]
    # Parameters the user set that litellm has no Anthropic name for: it
    # forwards them under their OpenAI names (litellm_adapter._untranslated),
    # and Anthropic's 400 names them. A response_format without a schema is
    # one: litellm's translation would ignore it.
    forwarded = {**given, "response_format": request.response_format}
    for name in explicit_params(request):
        if name not in forwarded:
            continue
        # temperature and top_p on a model without sampling: litellm's mapping drops them, so it forwards them.
        dropped = name in ("temperature", "top_p") and name not in body
        if name not in _TRANSLATED or name == "response_format" or dropped:
            body[name] = forwarded[name]
    messages = list(request.messages)
    if "tools" not in body and any(message.get("tool_calls") is not None for message in messages):
        body["tools"] = [dict(_DUMMY_TOOL)]  # Anthropic refuses tool_use blocks without tools
    system = _system(messages)
    if system:
        body["system"] = system
    body["messages"] = _messages([message for message in messages if message.get("role") != "system"])
    body.setdefault("max_tokens", _default_max_tokens(model))
    body["stream"] = True
    return body


def _samples(model: str) -> bool:
    """Whether the model takes temperature and top_p (litellm drops them for those that do not)."""
    info = model_map.entry(model)
    flag = info.get("supports_sampling_params") if info is not None else None
    if isinstance(flag, bool):
        return flag
    lowered = model.lower()
    return not any(marker in lowered for marker in _NO_SAMPLING_MARKERS)


def _default_max_tokens(model: str) -> int:
    info = model_map.entry(model)
    if info is not None:
        value = info.get("max_output_tokens") if "max_output_tokens" in info else info.get("max_tokens")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    try:
        return int(os.environ.get(_FALLBACK_MAX_TOKENS_VARIABLE, _FALLBACK_MAX_TOKENS))
    except ValueError:
        return _FALLBACK_MAX_TOKENS


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    schema = dict(parameters) if parameters else {}
    if schema.get("type") != "object":
        schema["type"] = "object"
    schema.setdefault("properties", {})
    mapped: dict[str, Any] = {
        "name": function["name"],
        "input_schema": {key: schema[key] for key in _SCHEMA_KEYS if key in schema},
        "type": "custom",
    }
    if function.get("description") is not None:
        mapped["description"] = function["description"]
    return mapped


def _tool_choice(choice: str | dict[str, Any] | None, parallel: bool) -> dict[str, Any]:
    """OpenAI's tool_choice as litellm maps it: parallel_tool_calls, always
    given with tools, becomes ``disable_parallel_tool_use`` except with "none"
    (a string or an object)."""
    kind: str | None = None
    mapped: dict[str, Any]
    if isinstance(choice, dict) and "type" in choice and "function" not in choice:
        kind = {"auto": "auto", "required": "any", "any": "any", "none": "none"}.get(str(choice["type"]))
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name is not None:
            return {"type": "tool", "name": name, "disable_parallel_tool_use": not parallel}
    elif choice is not None:
        kind = {"auto": "auto", "required": "any", "none": "none"}.get(choice)
    if kind == "none":
        return {"type": "none"}  # without disable_parallel_tool_use, as litellm sends it
    mapped = {"type": kind or "auto"}
    mapped["disable_parallel_tool_use"] = not parallel
    return mapped


def _system(messages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    blocks = []
    for message in messages:
        if message.get("role") != "system":
            continue
        content = message.get("content")
        if isinstance(content, str):
            if content:
                blocks.append({"type": "text", "text": content})
        elif isinstance(content, list):
            blocks += [{"type": "text", "text": part["text"]} for part in content if part.get("text")]
    return blocks


def _messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Alternating user and assistant turns: consecutive user-side messages
    (tool results included) merged into one turn, assistant messages likewise."""
    turns: list[dict[str, Any]] = []
    at = 0
    while at < len(messages):
        user: list[dict[str, Any]] = []
        while at < len(messages) and messages[at]["role"] in ("user", "tool"):
            message = messages[at]
            if message["role"] == "tool":
                user.append(_tool_result(message))
            else:
                user += _user_content(_filled(message.get("content")))
            at += 1
        if user:
            turns.append({"role": "user", "content": user})
        assistant: list[dict[str, Any]] = []
        seen: set[str] = set()
        while at < len(messages) and messages[at]["role"] == "assistant":
            assistant += _assistant_content(messages[at], seen)
            at += 1
        if assistant:
            turns.append({"role": "assistant", "content": assistant})
    if turns and turns[-1]["role"] == "assistant":
        for block in turns[-1]["content"]:
            if block["type"] == "text":
                block["text"] = block["text"].rstrip()  # Anthropic refuses a final turn ending in whitespace
    return turns


def _filled(content: Any) -> Any:
    """Empty or blank text replaced by litellm's placeholder."""
    if isinstance(content, str):
        return content if content.strip() else EMPTY_TEXT
    if isinstance(content, list):
        return [
            {**part, "text": EMPTY_TEXT} if part.get("type") == "text" and not part.get("text", "").strip() else part
            for part in content
        ]
    return content


def _user_content(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks = []
    for part in content:
        if part["type"] == "text":
            blocks.append({"type": "text", "text": part["text"]})
        else:
            blocks.append({"type": "image", "source": _image_source(part["image_url"])})
    return blocks


def _image_source(image: str | dict[str, Any]) -> dict[str, Any]:
    url = image if isinstance(image, str) else image["url"]
    if url.startswith("https://"):
        return {"type": "url", "url": url}
    media_type, data = _data_url(url) or ("", "")
    given_format = image.get("format") if isinstance(image, dict) else None
    return {"type": "base64", "media_type": given_format or media_type, "data": data}


def _tool_result(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, list):
        content = [{"type": "text", "text": part["text"]} for part in content]
    tool_use_id = _TOOL_ID_INVALID.sub("_", message["tool_call_id"]) or "tool_use_id"
    return {"type": "tool_result", "tool_use_id": tool_use_id, "content": content}


def _assistant_content(message: dict[str, Any], seen: set[str]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    content = _filled(message.get("content"))
    if isinstance(content, list):
        blocks += [{"type": "text", "text": part["text"]} for part in content if part.get("text")]
    elif isinstance(content, str) and content:
        blocks.append({"type": "text", "text": content})
    for call in message.get("tool_calls") or []:
        call_id = _TOOL_ID_INVALID.sub("_", call["id"]) or "tool_use_id"
        if call_id in seen:
            continue  # litellm drops a repeated id within one turn ("tool_use ids must be unique")
        seen.add(call_id)
        function = call["function"]
        blocks.append(
            {
                "type": "tool_use",
                "id": call_id,
                "name": function["name"],
                "input": _arguments(function.get("arguments")),
            }
        )
    return blocks
