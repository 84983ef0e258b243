"""Scripted answers for the built-in offline model, set by tests at run time.

A test programs the offline model without touching the prompts of the code
under test: it adds rules through the admin API (``POST /admin/offline/rules``)
or the pytest plugin's ``assistants_api.script(...)``. A rule matches on the
run's assistant, its thread's metadata, the model name or the last user
message, and answers with text, a refusal, tool calls (any function, ``file_search``
with a query, ``code_interpreter`` with code), several tool rounds, a delay,
a failure or a hang.

A rule is compiled into the offline model's own directive vocabulary (the
``[[verb arg]]`` pairs of docs/offline-model.md) without going through text,
so whatever a test writes in ``text`` is answered verbatim, ``]]`` included.

Rules live in the process that executes runs (``serve`` with its embedded
worker, as the ephemeral test server runs); the first matching rule wins,
rules added later are tried first only if added with ``first: true``.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

FailCode = Literal["rate_limit", "server_error", "invalid_prompt"]
Directive = tuple[str, str]

_FAIL_CODES: tuple[FailCode, ...] = ("rate_limit", "server_error", "invalid_prompt")
_FINISH = ("stop", "length", "content_filter")
# Runs whose answering rule is remembered for their later tool rounds.
_REMEMBERED_RUNS = 10_000


class ScriptError(ValueError):
    """A rule that cannot be understood; the message names the field."""


@dataclass(frozen=True)
class RequestContext:
    """Who a completion is for; the offline model matches rules against it.
    None for completions made outside a run (chat completions)."""

    run_id: str | None = None
    thread_id: str | None = None
    assistant_id: str | None = None
    thread_metadata: Mapping[str, str] = field(default_factory=dict)
    # Where the model-request log's record of this completion goes: a run's
    # executor keeps it for its next commit (one transaction fewer per call).
    on_exchange: Callable[[Any], None] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, passed through verbatim


@dataclass(frozen=True)
class Round:
    """One completion of the scripted answer: text and/or tool calls."""

    text: str | None = None
    refusal: str | None = None  # the model declines: streamed as delta.refusal, after any text
    tokens: int | None = None  # filler words instead of (or after) text
    tool_calls: tuple[ToolCall, ...] = ()
    fail: FailCode | None = None
    fail_after: int = 0
    finish: str | None = None
    hang: bool = False

    def directives(self) -> list[Directive]:
        found: list[Directive] = []
        if self.text is not None:
            found.append(("reply", self.text))
        if self.tokens is not None:
            found.append(("tokens", str(self.tokens)))
        if self.refusal is not None:
            found.append(("refuse", self.refusal))
        found.extend(("call", f"{call.name} {call.arguments}") for call in self.tool_calls)
        if self.fail is not None:
            found.append(("fail", f"{self.fail} after {self.fail_after}"))
        if self.finish is not None:
            found.append(("finish", self.finish))
        if self.hang:
            found.append(("hang", ""))
        return found


@dataclass(frozen=True)
class Match:
    """Every given field must hold; an empty Match matches every completion."""

    assistant_id: str | None = None
    model: str | None = None
    message: re.Pattern[str] | None = None  # searched in the last user message
    thread_metadata: Mapping[str, str] = field(default_factory=dict)

    def holds(self, model: str, user_text: str, context: RequestContext | None) -> bool:
        context = context or RequestContext()
        if self.assistant_id is not None and self.assistant_id != context.assistant_id:
            return False
        if self.model is not None and self.model != model:
            return False
        if self.message is not None and self.message.search(user_text) is None:
            return False
        return all(context.thread_metadata.get(key) == value for key, value in self.thread_metadata.items())


@dataclass(frozen=True)
class Rule:
    id: str
    match: Match
    rounds: tuple[Round, ...]
    delay_ms: int = 0
    times: int | None = None  # None: every time
    raw: Mapping[str, Any] = field(default_factory=dict)  # as the test sent it, for listing

    def directives(self) -> list[Directive]:
        found: list[Directive] = []
        for position, scripted in enumerate(self.rounds):
            if position:
                found.append(("then", ""))
            found.extend(scripted.directives())
        if self.delay_ms:
            found.append(("delay", str(self.delay_ms)))
        return found


class ScriptBook:
    """The rules a test added, in order; safe to use from the API and the worker."""

    def __init__(self) -> None:
        self._rules: list[Rule] = []
        self._used: dict[str, int] = {}
        self._answering: dict[str, str] = {}  # run id -> the rule that answered its first round
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def add(self, body: Mapping[str, Any]) -> Rule:
        rule = parse_rule(body, f"rule_{next(self._ids)}")
        with self._lock:
            if body.get("first") is True:
                self._rules.insert(0, rule)
            else:
                self._rules.append(rule)
        return rule

    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules)

    def remove(self, rule_id: str) -> bool:
        with self._lock:
            before = len(self._rules)
            self._rules = [rule for rule in self._rules if rule.id != rule_id]
            return len(self._rules) != before

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            self._used.clear()
            self._answering.clear()

    def needs_thread_metadata(self) -> bool:
        with self._lock:
            return any(rule.match.thread_metadata for rule in self._rules)

    def used(self, rule_id: str) -> int:
        with self._lock:
            return self._used.get(rule_id, 0)

    def answer(
        self, model: str, user_text: str, rounds: int, context: RequestContext | None, *, peek: bool = False
    ) -> list[Directive] | None:
        """The directives of the first rule matching this completion.

        ``rounds`` counts the tool rounds since the last user message: a
        rule's first completion is its use (later rounds of the same answer
        do not count against ``times``, and come from the rule that answered
        the run's first round, even once its ``times`` are spent).
        ``peek``: the same answer, its use not counted (the offline model
        looking whether it can answer at once, before it does).

        A run's first round asked again is the same rule's answer, not
        another use: its first answer was not kept (the claim's transaction
        holding it rolled back, or the worker stopped before its commit) and
        the run is retried. Counted in memory when the answer is taken, a use
        is counted once per run, so a rule with ``times: 1`` answers that
        one run, however often its claim is retried."""
        run_id = context.run_id if context is not None else None
        with self._lock:
            if run_id is not None and run_id in self._answering:
                chosen = next((rule for rule in self._rules if rule.id == self._answering[run_id]), None)
                if chosen is not None and (rounds > 0 or chosen.match.holds(model, user_text, context)):
                    return chosen.directives()
            for rule in self._rules:
                if not rule.match.holds(model, user_text, context):
                    continue
                used = self._used.get(rule.id, 0)
                if rounds == 0:
                    if rule.times is not None and used >= rule.times:
                        continue
                    if peek:
                        return rule.directives()
                    self._used[rule.id] = used + 1
                    if run_id is not None:
                        self._remember(run_id, rule.id)
                return rule.directives()
        return None

    def _remember(self, run_id: str, rule_id: str) -> None:
        self._answering.pop(run_id, None)
        self._answering[run_id] = rule_id
        while len(self._answering) > _REMEMBERED_RUNS:  # oldest first: dicts keep insertion order
            del self._answering[next(iter(self._answering))]


# ------------------------------------------------------------------ parsing


def parse_rule(body: Mapping[str, Any], rule_id: str) -> Rule:
    if not isinstance(body, Mapping):
        raise ScriptError("a rule must be a JSON object")
    unknown = set(body) - {"match", "respond", "rounds", "delay_ms", "times", "first"}
    if unknown:
        raise ScriptError(f"unknown field(s) {sorted(unknown)}: use match, respond, rounds, delay_ms, times, first")
    if ("respond" in body) == ("rounds" in body):
        raise ScriptError("give either 'respond' (one answer) or 'rounds' (a list, one per tool round)")
    raw_rounds = [body["respond"]] if "respond" in body else body["rounds"]
    if not isinstance(raw_rounds, list) or not raw_rounds:
        raise ScriptError("'rounds' must be a non-empty list")
    rounds = tuple(_parse_round(item, f"rounds[{n}]") for n, item in enumerate(raw_rounds))
    return Rule(
        id=rule_id,
        match=_parse_match(body.get("match") or {}),
        rounds=rounds,
        delay_ms=_non_negative(body.get("delay_ms", 0), "delay_ms"),
        times=None if body.get("times") is None else _non_negative(body["times"], "times"),
        raw=dict(body),
    )


def _parse_match(raw: Any) -> Match:
    if not isinstance(raw, Mapping):
        raise ScriptError("'match' must be an object")
    unknown = set(raw) - {"assistant_id", "model", "message", "thread_metadata"}
    if unknown:
        raise ScriptError(f"match: unknown field(s) {sorted(unknown)}")
    message = raw.get("message")
    try:
        pattern = re.compile(message) if isinstance(message, str) else None
    except re.error as exc:
        raise ScriptError(f"match.message is not a valid regular expression: {exc}") from None
    metadata = raw.get("thread_metadata") or {}
    if not isinstance(metadata, Mapping) or not all(isinstance(v, str) for v in metadata.values()):
        raise ScriptError("match.thread_metadata must map keys to string values")
    return Match(
        assistant_id=_optional_str(raw.get("assistant_id"), "match.assistant_id"),
        model=_optional_str(raw.get("model"), "match.model"),
        message=pattern,
        thread_metadata=dict(metadata),
    )


def _parse_round(raw: Any, where: str) -> Round:
    if isinstance(raw, str):
        return Round(text=raw)
    if not isinstance(raw, Mapping):
        raise ScriptError(f"{where}: expected text or an object")
    unknown = set(raw) - {"text", "refusal", "tokens", "tool_calls", "fail", "finish", "hang"}
    if unknown:
        raise ScriptError(f"{where}: unknown field(s) {sorted(unknown)}")
    fail, fail_after = _parse_fail(raw.get("fail"), where)
    finish = raw.get("finish")
    if finish is not None and finish not in _FINISH:
        raise ScriptError(f"{where}.finish: one of {', '.join(_FINISH)}")
    calls = raw.get("tool_calls") or []
    if not isinstance(calls, list):
        raise ScriptError(f"{where}.tool_calls must be a list")
    tokens = raw.get("tokens")
    return Round(
        text=_optional_str(raw.get("text"), f"{where}.text"),
        refusal=_refusal(raw.get("refusal"), f"{where}.refusal"),
        tokens=None if tokens is None else _non_negative(tokens, f"{where}.tokens"),
        tool_calls=tuple(_parse_call(call, f"{where}.tool_calls[{n}]") for n, call in enumerate(calls)),
        fail=fail,
        fail_after=fail_after,
        finish=finish,
        hang=raw.get("hang") is True,
    )


def _parse_call(raw: Any, where: str) -> ToolCall:
    """{"function": NAME, "arguments": {...}}, {"file_search": {"query": Q}}
    or {"code_interpreter": {"code": C}}."""
    if not isinstance(raw, Mapping) or len(raw) == 0:
        raise ScriptError(f"{where}: expected an object")
    if "function" in raw:
        name = raw["function"]
        if not isinstance(name, str) or not name:
            raise ScriptError(f"{where}.function: a function name")
        arguments = raw.get("arguments", {})
        return ToolCall(name, arguments if isinstance(arguments, str) else json.dumps(arguments))
    for builtin, key in (("file_search", "query"), ("code_interpreter", "code")):
        if builtin in raw:
            spec = raw[builtin]
            if isinstance(spec, str):
                spec = {key: spec}
            if not isinstance(spec, Mapping) or not isinstance(spec.get(key), str):
                raise ScriptError(f"{where}.{builtin}: expected {{{key!r}: TEXT}}")
            return ToolCall(builtin, json.dumps({key: spec[key]}))
    raise ScriptError(f"{where}: one of 'function', 'file_search', 'code_interpreter'")


def _parse_fail(raw: Any, where: str) -> tuple[FailCode | None, int]:
    if raw is None:
        return None, 0
    if isinstance(raw, str):
        raw = {"code": raw}
    code = raw.get("code") if isinstance(raw, Mapping) else None
    if code not in _FAIL_CODES:
        raise ScriptError(f"{where}.fail: one of {', '.join(_FAIL_CODES)} (or {{code, after}})")
    after = _non_negative(raw.get("after", 0), f"{where}.fail.after")
    return code, after


def _optional_str(value: Any, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ScriptError(f"{where} must be a string")
    return value


def _refusal(value: Any, where: str) -> str | None:
    # An empty refusal streams nothing: the run would end with no message.
    if value is not None and (not isinstance(value, str) or not value):
        raise ScriptError(f"{where} must be a non-empty string")
    return value


def _non_negative(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ScriptError(f"{where} must be a non-negative integer")
    return value


def describe(rule: Rule, used: int) -> dict[str, Any]:
    """A rule as the admin API lists it."""
    return {"id": rule.id, "object": "offline.rule", "used": used, **rule.raw}
