"""The routing file: which provider (or the offline model) serves a model name.

The one reader of the file's ``model_list`` (see app/llm/__init__.py for its
format). A name resolves to a Route: the entry's ``litellm_params`` with the
wildcard filled in, and how it is served:

- ``offline`` or ``offline/...``: the built-in offline model (offline.py);
- direct: a provider whose API is OpenAI's chat completions as litellm sends
  it (``openai/`` or ``hosted_vllm/`` with an ``api_base``, ``azure/``
  deployments, the OpenAI-compatible providers providers.py lists, and
  ``anthropic/`` over Anthropic's Messages API: anthropic_messages.py) and no
  litellm_params beyond those the direct adapter understands: one HTTP request
  of our own (direct.py), no litellm; a name a direct wildcard fills in that
  litellm translates for (``openai/*`` asked for ``o3-mini``) goes through
  litellm, imported on its first use, unless the entry says ``direct: true``;
- everything else, or an entry with ``direct: false``: litellm
  (litellm_adapter.py). ``direct: true`` makes an entry the direct path cannot
  serve a start-up error rather than a silent fallback, and sends every name
  its wildcard fills in direct (the operator chose).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from app.llm import providers
from app.llm.interface import LLMConfigError, LLMError
from app.llm.offline import Rule, read_rules

OFFLINE = "offline"
ENV_REFERENCE = "os.environ/"
# Keys the LiteLLM proxy reads for its own routing; they are not completion
# parameters, so they must not reach litellm.acompletion().
ROUTER_KEYS = frozenset({"rpm", "tpm", "order", "weight", "max_parallel_requests", "max_input_tokens"})
_ROUTES_KEPT = 1024  # looked-up names whose Route is kept (routing.Router.route)
# Longer names are looked up, not kept: assistants and runs cap their model at
# 256 characters (wire ModelName), but a chat completion's or an embedding's
# model is any length the body allows, and 1,024 names of megabytes each,
# kept, would be gigabytes that one client chose.
_NAME_KEPT_AT_MOST = 256


@dataclass(frozen=True)
class Route:
    """Where one requested model name goes: litellm_params with wildcards filled in."""

    model: str
    params: Mapping[str, Any]
    info: Mapping[str, Any] = field(default_factory=dict)
    # Served by the direct adapter (direct.py) rather than litellm.
    direct: bool = False
    # A direct wildcard's entry that handed this name to litellm (which
    # reshapes its requests): only the request goes through litellm, imported
    # then; token counts and the context window are the direct routes'.
    handed_to_litellm: bool = False

    @property
    def counted_as_direct(self) -> bool:
        return self.direct or self.handed_to_litellm

    @property
    def target(self) -> str:
        return str(self.params["model"])

    @property
    def offline(self) -> bool:
        return self.target == OFFLINE or self.target.startswith(OFFLINE + "/")

    def configured_window(self) -> int | None:
        value = self.info.get("max_input_tokens") or self.params.get("max_input_tokens")
        return int(value) if value else None


@dataclass(frozen=True)
class Entry:
    """One model_list entry; ``pattern`` is None for an exact model_name."""

    name: str
    params: Mapping[str, Any]
    info: Mapping[str, Any]
    pattern: re.Pattern[str] | None
    direct: bool = False
    # ``direct: true``: no name the wildcard fills in is handed to litellm.
    forced: bool = False
    # Why the entry goes through litellm (None: it is direct or offline), for
    # the start-up error when litellm cannot be imported.
    needs_litellm_because: str | None = None

    @classmethod
    def parse(cls, raw: Any, position: int) -> Entry:
        where = f"model_list[{position}]"
        if not isinstance(raw, dict) or not isinstance(raw.get("model_name"), str):
            raise LLMConfigError(f"{where}: expected a mapping with a string model_name")
        params, info = raw.get("litellm_params"), raw.get("model_info") or {}
        if not isinstance(params, dict) or not isinstance(params.get("model"), str):
            raise LLMConfigError(f"{where}: litellm_params.model (a string) is required")
        if not isinstance(info, dict):
            raise LLMConfigError(f"{where}: model_info must be a mapping")
        name: str = raw["model_name"]
        pattern = None
        if "*" in name:
            pattern = re.compile("(.*)".join(re.escape(part) for part in name.split("*")), re.DOTALL)
        if providers.base_with_query(params):
            # (Not quoted: a query may hold a key.)
            raise LLMConfigError(
                f"{where} ('{name}'): its api_base has a query string, which the request's "
                "path would follow (.../chat/completions goes after it, on litellm's path too): give the "
                "base URL alone (a key goes in api_key or extra_headers, Azure's version in api_version)"
            )
        choice = raw.get("direct")
        if choice is not None and not isinstance(choice, bool):
            raise LLMConfigError(f"{where}: direct must be true or false")
        offline = Route(name, params).offline
        because = None if offline else _needs_litellm_because(choice, params, where)
        direct = not offline and because is None
        return cls(name, params, info, pattern, direct, forced=choice is True, needs_litellm_because=because)

    @property
    def target(self) -> str:
        return str(self.params["model"])

    def route(self, model: str) -> Route | None:
        if self.pattern is None:
            if model != self.name:
                return None
            captured: Sequence[str] = (model,)
        else:
            match = self.pattern.fullmatch(model)
            if match is None:
                return None
            captured = match.groups()
        params = dict(self.params)
        params["model"] = _fill_stars(str(params["model"]), captured)
        # A wildcard may fill in a name litellm translates for (``azure/*`` asked
        # for ``o3-mini``): that model goes through litellm, imported on first
        # use, unless the entry says ``direct: true``.
        translated = self.pattern is not None and not self.forced and providers.name_translated(params["model"])
        direct = self.direct and not translated
        # Read-only: the Router keeps this Route for every later lookup of the name.
        return Route(model, MappingProxyType(params), self.info, direct, handed_to_litellm=self.direct and not direct)


def direct_refusal(params: Mapping[str, Any]) -> str | None:
    """Why the direct adapter cannot serve these litellm_params; None if it can."""
    return providers.refusal(params, ROUTER_KEYS)


def _needs_litellm_because(choice: bool | None, params: Mapping[str, Any], where: str) -> str | None:
    """Why a provider's entry goes through litellm; None if it is served
    directly. ``direct: true`` with a reason is a start-up error."""
    if choice is False:
        return "it says direct: false"
    refusal = direct_refusal(params)
    if choice is True and refusal is not None:
        raise LLMConfigError(f"{where}: direct: true, but {refusal}")
    return refusal


def _fill_stars(template: str, captured: Sequence[str]) -> str:
    """``openai/*`` + ("gpt-4o",) -> ``openai/gpt-4o``; extra stars reuse the last capture."""
    pieces = template.split("*")
    out = [pieces[0]]
    for position, piece in enumerate(pieces[1:]):
        out += [captured[min(position, len(captured) - 1)], piece]
    return "".join(out)


# Router.route's "not looked up yet" (None is a name with no route).
_UNSEEN: Any = object()


@dataclass(frozen=True)
class Router:
    exact: Mapping[str, Entry]
    wildcards: Sequence[Entry]  # most specific (longest literal text) first
    everything_offline: bool  # no model_list at all
    # The file's embedding_model names a routed provider: embeddings always go through litellm.
    embeds_through_litellm: bool = False
    # Each name's Route, made once: a run looks its model up three or four
    # times (the answer, the prompt's token count, the provider call), and a
    # wildcard's lookup copies the entry's params, matches its pattern and
    # checks the filled-in name (bench/README.md, branch dircpu). A Route
    # holds no environment value (``os.environ/`` is resolved per call), so
    # nothing in it goes stale while the routing file stays the same.
    _routes: dict[str, Route | None] = field(default_factory=dict, init=False, compare=False, repr=False)

    @classmethod
    def build(cls, entries: Sequence[Entry] | None, embedding_model: Any = None) -> Router:
        if entries is None:
            return cls({}, (), True)
        exact: dict[str, Entry] = {}
        for entry in entries:
            if entry.pattern is None:
                exact.setdefault(entry.name, entry)  # the first of duplicates wins (no load balancing)
        wildcards = [entry for entry in entries if entry.pattern is not None]
        wildcards.sort(key=lambda entry: -len(entry.name.replace("*", "")))  # stable: ties keep file order
        # app/retrieval/embed.py embeds through litellm with the exact entry it names.
        named = exact.get(embedding_model) if isinstance(embedding_model, str) else None
        embeds = named is not None and not Route(named.name, named.params).offline
        return cls(exact, wildcards, False, embeds)

    def route(self, model: str) -> Route | None:
        kept: Route | None = self._routes.get(model, _UNSEEN)
        if kept is not _UNSEEN:
            return kept
        route = self._find(model)
        if len(model) <= _NAME_KEPT_AT_MOST:
            if len(self._routes) >= _ROUTES_KEPT:  # requests name models: a wildcard admits any number
                self._routes.clear()
            self._routes[model] = route
        return route

    def _find(self, model: str) -> Route | None:
        if model in self.exact:
            return self.exact[model].route(model)
        for entry in self.wildcards:
            route = entry.route(model)
            if route is not None:
                return route
        return Route(model, MappingProxyType({"model": f"{OFFLINE}/{model}"})) if self.everything_offline else None

    def _entries(self) -> list[Entry]:
        return [*self.exact.values(), *self.wildcards]

    def needs_litellm(self) -> bool:
        """Some entry is served by litellm (neither offline nor direct), or embeddings are."""
        return self.embeds_through_litellm or any(
            not entry.direct and not Route(entry.name, entry.params).offline for entry in self._entries()
        )

    def has_direct(self) -> bool:
        return any(entry.direct for entry in self._entries())

    def why_litellm(self) -> list[str]:
        """What needs litellm, one line each: the entries it serves (their
        model_name, target and why not direct) and the embeddings."""
        lines = [
            f"model_list entry '{entry.name}' ({entry.target}): {entry.needs_litellm_because}"
            for entry in self._entries()
            if entry.needs_litellm_because is not None
        ]
        if self.embeds_through_litellm:
            lines.append("embedding_model names a routed provider: embeddings always go through litellm")
        return lines


def read_config(path: Path) -> tuple[Router, list[Rule]]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML also reads JSON
    except (OSError, yaml.YAMLError) as exc:
        raise LLMConfigError(f"cannot read the model routing config {path}: {exc}") from exc
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise LLMConfigError(f"{path}: expected a mapping with a model_list")
    try:
        raw_list = data.get("model_list")
        if raw_list is not None and not isinstance(raw_list, list):
            raise LLMConfigError("model_list must be a list")
        entries = None if not raw_list else [Entry.parse(raw, n) for n, raw in enumerate(raw_list)]
        return Router.build(entries, data.get("embedding_model")), read_rules(data.get("offline"), path.parent)
    except LLMConfigError as exc:
        raise LLMConfigError(f"{path}: {exc}") from None


def resolve_env(value: Any, model: str) -> Any:
    """Replace ``os.environ/NAME`` strings, at call time so key rotation needs no restart."""
    if isinstance(value, str) and value.startswith(ENV_REFERENCE):
        name = value[len(ENV_REFERENCE) :]
        if name not in os.environ:
            raise LLMError(
                "server_error",
                f"The routing config for model '{model}' reads the environment variable {name}, which is not set.",
            )
        return os.environ[name]
    if isinstance(value, dict):
        return {key: resolve_env(item, model) for key, item in value.items()}
    if isinstance(value, list):
        return [resolve_env(item, model) for item in value]
    return value
