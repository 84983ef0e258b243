"""The built-in offline model: deterministic, instant, steered by ``[[cues]]``
in the conversation (docs/offline-model.md), by rules a test adds at run time
(app/scripting.py) and by the routing file's ``offline.rules``."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

from app.llm.interface import (
    ChatRequest,
    ErrorCode,
    Event,
    Finish,
    FinishReason,
    LLMConfigError,
    LLMError,
    RefusalDelta,
    TextDelta,
    ToolCallDelta,
    Usage,
)
from app.scripting import ScriptBook

CONTEXT_WINDOW = 128_000

_CJK = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
# A token is a word with the whitespace before it, or one CJK character (these
# scripts have no spaces); trailing whitespace is a token of its own. Joining
# the tokens gives back the text exactly.
_TOKEN = re.compile(rf"\s*[{_CJK}]|\s*[^\s{_CJK}]+|\s+")
_FILLER = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do", "eiusmod")
_IMAGE_TOKENS = 85
_FAIL_KINDS: Mapping[str, ErrorCode] = {
    "rate_limit": "rate_limit_exceeded",
    "rate_limit_exceeded": "rate_limit_exceeded",
    "server_error": "server_error",
    "invalid_prompt": "invalid_prompt",
}
_VERBS = ("reply", "refuse", "tokens", "call", "then", "json", "fail", "fail_after", "finish", "delay", "hang")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict) and "text" in part)
    return ""


def _images_of(content: Any) -> list[str]:
    """Short descriptions of a message's image parts, so replies show what arrived."""
    found = []
    for part in content if isinstance(content, list) else []:
        if not isinstance(part, dict) or part.get("type") not in ("image_url", "image_file"):
            continue
        ref = part.get(part["type"]) or {}
        url = str(ref.get("url") or ref.get("file_id") or "") if isinstance(ref, dict) else str(ref)
        header, _, data = url.partition(",")
        if url.startswith("data:") and header.endswith(";base64"):
            size = len(data) * 3 // 4 - (len(data) - len(data.rstrip("=")))
            url = f"{header[5:-7]}, {size} bytes"
        found.append(url)
    return found


def count_prompt_tokens(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    """3 + per message (3 + words + 85 per image + per tool call 1 + argument words), + words of the tools' JSON."""
    total = 3
    for message in messages:
        content = message.get("content")
        total += 3 + len(tokens(_text_of(content))) + _IMAGE_TOKENS * len(_images_of(content))
        for call in message.get("tool_calls") or []:
            total += 1 + len(tokens(str((call.get("function") or {}).get("arguments", ""))))
    return total + (len(tokens(json.dumps(tools))) if tools else 0)


def _scan(text: str) -> tuple[list[tuple[str, str]], str]:
    """Split ``[[verb arg]]`` directives out of text; returns them and the remaining text."""
    directives: list[tuple[str, str]] = []
    plain: list[str] = []
    position = 0
    while (start := text.find("[[", position)) != -1:
        end = _directive_end(text, start + 2)
        if end == -1:
            break
        plain.append(text[position:start])
        verb, *arg = text[start + 2 : end].split(maxsplit=1) or [""]
        directives.append((verb.lower(), arg[0].strip() if arg else ""))
        position = end + 2
    plain.append(text[position:])
    # Close the gaps the directives leave, but keep the author's line breaks.
    return directives, re.sub(r"[ \t]{2,}", " ", "".join(plain)).strip() if directives else text.strip()


def _directive_end(text: str, start: int) -> int:
    """Index of the ``]]`` closing a directive, skipping brackets and strings of JSON arguments."""
    depth, in_string, escaped = 0, False, False
    for position in range(start, len(text)):
        char = text[position]
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"' and depth > 0:
            in_string = True
        elif depth == 0 and text.startswith("]]", position):
            return position
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
    return text.find("]]", start)  # unbalanced: the first ]] closes it


@dataclass
class _Step:
    """What the model does in one completion (one tool round)."""

    text: list[str] = field(default_factory=list)
    refusal: list[str] = field(default_factory=list)  # streamed after the text, as delta.refusal
    calls: list[tuple[str, str]] = field(default_factory=list)
    fail: tuple[ErrorCode, int] | None = None  # error, deltas emitted before it
    finish: FinishReason | None = None
    hang: bool = False


@dataclass
class _Script:
    steps: list[_Step] = field(default_factory=lambda: [_Step()])
    json: bool = False
    delay: float = 0.0

    @classmethod
    def parse(cls, directives: Sequence[tuple[str, str]]) -> _Script:
        script = cls()
        for verb, arg in directives:
            script.apply(verb, arg)
        return script

    def step(self, rounds: int) -> _Step | None:
        return self.steps[rounds] if rounds < len(self.steps) else None

    def apply(self, verb: str, arg: str) -> None:
        step = self.steps[-1]
        if verb == "then":
            self.steps.append(_Step())
            if arg:  # [[then call b]] is [[then]] [[call b]]
                verb, _, rest = arg.partition(" ")
                self.apply(verb.lower(), rest.strip())
        elif verb == "reply":
            step.text.append(arg)
        elif verb == "refuse":
            step.refusal.append(arg)
        elif verb == "tokens":
            step.text.append(" ".join(_FILLER[n % len(_FILLER)] for n in range(_count(verb, arg))))
        elif verb == "call":
            name, _, arguments = arg.partition(" ")
            if not name:
                raise _cue_error("[[call NAME {json arguments}]] needs a function name")
            step.calls.append((name, arguments.strip() or "{}"))
        elif verb in ("fail", "fail_after"):
            step.fail = _parse_fail(verb, arg)
        else:
            self._apply_setting(step, verb, arg)

    def _apply_setting(self, step: _Step, verb: str, arg: str) -> None:
        if verb == "json":
            self.json = True
        elif verb == "delay":
            self.delay = _count(verb, arg) / 1000
        elif verb == "hang":
            step.hang = True
        elif verb == "finish" and arg in ("stop", "length", "content_filter"):
            step.finish = cast(FinishReason, arg)
        elif verb == "finish":
            raise _cue_error("[[finish REASON]] takes stop, length or content_filter")
        else:
            raise _cue_error(f"unknown directive [[{verb}]]; known: {', '.join(_VERBS)}")


def _cue_error(problem: str) -> LLMError:
    return LLMError("invalid_prompt", f"Offline model: {problem} (see docs/offline-model.md).")


def _count(verb: str, arg: str) -> int:
    if not (arg.isascii() and arg.isdigit()):  # isdigit() alone admits "²", which int() refuses
        raise _cue_error(f"[[{verb} N]] needs a whole number, got {arg!r}")
    return int(arg)


def _parse_fail(verb: str, arg: str) -> tuple[ErrorCode, int]:
    """``fail KIND``, ``fail KIND after N`` or ``fail_after N KIND``."""
    words = arg.split()
    if verb == "fail_after" and len(words) == 2:
        words = [words[1], "after", words[0]]
    if len(words) == 1:
        words += ["after", "0"]
    if len(words) != 3 or words[1] != "after" or words[0] not in _FAIL_KINDS:
        raise _cue_error(
            f"[[{verb} {arg}]]: use [[fail KIND]] or [[fail KIND after N]], KIND in {', '.join(_FAIL_KINDS)}"
        )
    return _FAIL_KINDS[words[0]], _count(verb, words[2])


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern[str]
    respond: str

    def answer(self, text: str) -> str | None:
        match = self.pattern.search(text)
        if match is None:
            return None
        # Only \1 and \g<name> are group references; other backslashes stay as
        # written, so JSON escapes in `respond` survive.
        return re.sub(
            r"\\(\d+)|\\g<(\w+)>", lambda ref: match.group(int(ref[1]) if ref[1] else ref[2]) or "", self.respond
        )


def read_rules(section: Any, base: Path) -> list[Rule]:
    if section is None:
        return []
    raw = section.get("rules") if isinstance(section, dict) else None
    if isinstance(raw, str):  # a path to a YAML/JSON list, relative to the config file
        try:
            raw = yaml.safe_load((base / raw).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise LLMConfigError(f"offline.rules: cannot read {raw}: {exc}") from exc
    if not isinstance(raw, list):
        raise LLMConfigError("offline.rules must be a list of {match, respond} or a path to one")
    rules = []
    for position, rule in enumerate(raw):
        if not isinstance(rule, dict) or not isinstance(rule.get("match"), str) or "respond" not in rule:
            raise LLMConfigError(f"offline.rules[{position}]: expected {{match: REGEX, respond: TEXT}}")
        try:
            rules.append(Rule(re.compile(rule["match"]), str(rule["respond"])))
        except re.error as exc:
            raise LLMConfigError(f"offline.rules[{position}].match: {exc}") from exc
    return rules


@dataclass
class _Conversation:
    """What the offline model reads from the messages."""

    user_text: str
    images: list[str]
    system_text: str
    rounds: int  # assistant tool-call turns since the last user message
    tool_results: list[tuple[str, str]]  # (name, output) of the trailing tool messages
    size: int

    @classmethod
    def read(cls, messages: list[dict[str, Any]]) -> _Conversation:
        users = [n for n, message in enumerate(messages) if message.get("role") == "user"]
        last_user = users[-1] if users else -1
        content = messages[last_user].get("content") if users else None
        names: dict[str, str] = {}
        for message in messages:
            for call in message.get("tool_calls") or []:
                names[str(call.get("id"))] = str((call.get("function") or {}).get("name"))
        trailing: list[tuple[str, str]] = []
        for message in reversed(messages):
            if message.get("role") != "tool":
                break
            name = names.get(str(message.get("tool_call_id")), "tool")
            trailing.insert(0, (name, _text_of(message.get("content"))))
        system = [_text_of(m.get("content")) for m in messages if m.get("role") in ("system", "developer")]
        later = messages[last_user + 1 :]
        rounds = sum(1 for message in later if message.get("role") == "assistant" and message.get("tool_calls"))
        return cls(_text_of(content), _images_of(content), "\n".join(system), rounds, trailing, len(messages))


_CODE_TOOL = "code_interpreter"
_SEARCH_TOOL = "file_search"
_FENCED_PYTHON = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.DOTALL)


def _fenced_python(text: str) -> str | None:
    """The first ```python fenced block of a message: the code the built-in
    tool runs when the model is offered code_interpreter (so it is testable offline)."""
    match = _FENCED_PYTHON.search(text)
    return match.group(1) if match else None


# The longest answer (in deltas) the offline model hands over whole: a
# longer one is streamed, as one from any model.
AT_ONCE_MOST_DELTAS = 256


class OfflineModel:
    def __init__(self, rules: Sequence[Rule], script: ScriptBook) -> None:
        self._rules = rules
        self._book = script

    def _script(self, conversation: _Conversation, request: ChatRequest, *, peek: bool) -> tuple[_Script, str, bool]:
        """Directives of the last user message, else the first scripted rule a
        test added that matches, else its fenced Python for code_interpreter,
        else the system messages, else the first matching config rule; and
        whether a scripted rule answered (``peek``: its use not counted)."""
        directives, user_text = _scan(conversation.user_text)
        scripted = None
        if not directives:
            scripted = self._book.answer(request.model, user_text, conversation.rounds, request.context, peek=peek)
            directives = scripted or []
        code = _fenced_python(conversation.user_text)
        if not directives and code is not None and _CODE_TOOL in _function_names(request):
            directives = [("call", f"{_CODE_TOOL} {json.dumps({'code': code})}")]
        if not directives:
            directives = _scan(conversation.system_text)[0]
        for rule in [] if directives else self._rules:
            respond = rule.answer(conversation.user_text)
            if respond is not None:
                directives = _scan(respond)[0] or [("reply", respond)]
                break
        if not directives and user_text and _SEARCH_TOOL in _function_names(request) and request.tool_choice != "none":
            # Offered file_search and told nothing else: search with the question (issue 12).
            directives = [("call", _SEARCH_TOOL)]
        return _Script.parse(directives), user_text, scripted is not None

    def _plan(self, request: ChatRequest, prompt_tokens: int, *, peek: bool = False) -> _Plan:
        conversation = _Conversation.read(request.messages)
        script, user_text, scripted = self._script(conversation, request, peek=peek)
        step = script.step(conversation.rounds)
        text, calls = _answer(request, conversation, script, step, user_text)
        deltas = _deltas(text, step.refusal if step else [], calls, conversation)
        truncated = request.max_tokens is not None and len(deltas) > request.max_tokens
        deltas = deltas[: request.max_tokens] if truncated else deltas
        reason: FinishReason = "tool_calls" if calls else "stop"
        reason = "length" if truncated else (step.finish if step and step.finish else reason)
        taken = (
            (lambda: self._book.answer(request.model, user_text, conversation.rounds, request.context))
            if scripted and peek
            else None
        )
        return _Plan(deltas, Finish(reason, Usage(prompt_tokens, len(deltas))), script.delay, step, taken)

    def answer(self, request: ChatRequest, prompt_tokens: int) -> list[Event] | None:
        """The whole answer (its deltas, then its Finish) when nothing makes
        it take time or fail (no delay, hang or failure cued) and it is short
        (at most AT_ONCE_MOST_DELTAS): the executor then writes it in one
        transaction (issue 17). None: stream() it; a scripted rule's use is
        then counted by stream(), once, as for any answer."""
        try:
            plan = self._plan(request, prompt_tokens, peek=True)
        except LLMError:
            # A cue it cannot follow: the same error again, the rule's use
            # counted as stream() would count it.
            self._plan(request, prompt_tokens)
            raise
        if plan.delay or (plan.step is not None and (plan.step.fail or plan.step.hang)):
            return None
        if len(plan.deltas) > AT_ONCE_MOST_DELTAS:
            return None  # built, encoded and written in one go, holding the write lock meanwhile
        if plan.taken is not None:
            plan.taken()  # the rule's use, counted now that its answer is taken
        return [*plan.deltas, plan.finish]

    async def stream(self, request: ChatRequest, prompt_tokens: int) -> AsyncGenerator[Event, None]:
        plan = self._plan(request, prompt_tokens)
        step = plan.step
        fail_at = min(step.fail[1], len(plan.deltas)) if step and step.fail else None
        for position, delta in enumerate([*plan.deltas, None]):
            if position == fail_at and step and step.fail:
                raise LLMError(step.fail[0], f"Offline model: failing on cue ([[fail {step.fail[0]}]]).")
            await asyncio.sleep(plan.delay)  # also yields to the loop between deltas
            if delta is not None:
                yield delta
        if step and step.hang:
            await asyncio.Future()  # never resolves: the consumer cancels it
        yield plan.finish


@dataclass
class _Plan:
    """One completion's answer, worked out before anything is sent."""

    deltas: list[Event]
    finish: Finish
    delay: float  # seconds before each delta (and the Finish)
    step: _Step | None
    # Counts the scripted rule's use, for a plan made with ``peek``.
    taken: Callable[[], object] | None = None


def _answer(
    request: ChatRequest, conversation: _Conversation, script: _Script, step: _Step | None, user_text: str
) -> tuple[str, list[tuple[str, str]]]:
    calls = _choose_calls(request, step.calls if step else [], conversation.rounds)
    calls = [_with_query(name, arguments, user_text) for name, arguments in calls]
    offered = _function_names(request)
    for name, _ in calls:
        if name not in offered:
            raise _cue_error(f"told to call '{name}', but the request offers no such function (offered: {offered})")
    if step is not None and step.text:
        return " ".join(step.text), calls
    if calls or (step is not None and step.refusal):  # a refusal alone has no text
        return "", calls
    return _default_text(request, conversation, script.json, user_text), calls


def _function_names(request: ChatRequest) -> list[str]:
    return [str((tool.get("function") or {}).get("name")) for tool in request.tools]


def _with_query(name: str, arguments: str, question: str) -> tuple[str, str]:
    """A file_search call the script gave no query searches with the user's question."""
    if name != _SEARCH_TOOL or not question:
        return name, arguments
    with suppress(ValueError):
        parsed = json.loads(arguments or "{}")
        if isinstance(parsed, dict) and not parsed.get("query"):
            return name, json.dumps({**parsed, "query": question}, ensure_ascii=False)
    return name, arguments


def _choose_calls(request: ChatRequest, calls: list[tuple[str, str]], rounds: int) -> list[tuple[str, str]]:
    """Apply tool_choice; forcing a call applies only to a turn's first completion, so runs end.

    With no tools offered the script's calls are dropped, as with tool_choice
    "none": an assistant scripted to call tools still answers a run that
    disables them.
    """
    choice = request.tool_choice
    if choice == "none" or not request.tools:
        return []
    if isinstance(choice, dict):
        name = str((choice.get("function") or {}).get("name"))
        calls = [call for call in calls if call[0] == name]
        if not calls and rounds == 0:
            calls = [(name, "{}")]
    elif choice == "required" and not calls and rounds == 0:
        calls = [(_function_names(request)[0], "{}")]
    return calls if request.parallel_tool_calls else calls[:1]


def _default_text(request: ChatRequest, conversation: _Conversation, force_json: bool, user_text: str) -> str:
    if conversation.tool_results:
        sentence = "Tool results: " + "; ".join(f"{name} -> {output}" for name, output in conversation.tool_results)
    else:
        shown = " ".join([user_text, *(f"[image: {image}]" for image in conversation.images)]).strip()
        sentence = f"You said: {shown}" if shown else "You said nothing."
    response_format = request.response_format or {}
    if response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {}
        return json.dumps(_placeholder(schema, schema), ensure_ascii=False)
    if force_json or response_format.get("type") == "json_object":
        return json.dumps({"message": sentence}, ensure_ascii=False)
    return sentence


def _placeholder(schema: Any, root: Mapping[str, Any], depth: int = 0) -> Any:
    """A value matching a JSON schema's required shape: "" / 0 / false / null, first enum or variant."""
    if not isinstance(schema, dict) or depth > 16:
        return None
    if isinstance(schema.get("$ref"), str):
        target: Any = root
        for key in schema["$ref"].removeprefix("#/").split("/"):
            target = target.get(key) if isinstance(target, dict) else None
        return _placeholder(target, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return _placeholder(schema[key][0], root, depth + 1)
    kind = schema.get("type", "object" if "properties" in schema else None)
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "object":
        properties = schema.get("properties") or {}
        keys = schema.get("required") or list(properties)
        return {key: _placeholder(properties.get(key, {}), root, depth + 1) for key in keys}
    if kind == "array":
        return [_placeholder(schema.get("items", {}), root, depth + 1) for _ in range(schema.get("minItems", 0))]
    return {"string": "", "integer": 0, "number": 0, "boolean": False}.get(str(kind))


def _deltas(text: str, refusal: list[str], calls: list[tuple[str, str]], conversation: _Conversation) -> list[Event]:
    """One delta per token: text words first, then the refusal's, then each call's header and argument words."""
    deltas: list[Event] = [TextDelta(token) for token in tokens(text)]
    if refusal:
        deltas.extend(RefusalDelta(token) for token in tokens(" ".join(refusal)))
    for index, (name, arguments) in enumerate(calls):
        seed = f"{conversation.size}:{conversation.rounds}:{index}:{name}:{arguments}"
        call_id = "call_" + hashlib.sha256(seed.encode()).hexdigest()[:24]
        deltas.append(ToolCallDelta(index, id=call_id, name=name))
        deltas.extend(ToolCallDelta(index, arguments=piece) for piece in tokens(arguments))
    return deltas
