"""The litellm adapter: the only module that imports litellm, lazily.

The import costs about three seconds and 150 MiB, so it happens on first use:
``LLM.from_config`` pays it at start-up when a route needs litellm, so the
first run does not stall the event loop, and a server whose routes are all
offline or direct never pays it, unless a direct wildcard hands it a name
litellm reshapes requests for (``openai/*`` asked for ``o3-mini``): that first
call imports it in a thread of its own (load_off_the_loop). Before importing,
``LITELLM_LOCAL_MODEL_COST_MAP`` is defaulted to ``True`` (no network at
import) and HuggingFace tokenizer downloads are off, so token counting never
touches the network either.

Routes go to ``litellm.acompletion`` with their ``litellm_params`` as they
are, over our defaults ``drop_params: true`` and ``timeout: 600``; retries are
the provider SDK's own (set ``max_retries`` to change them). drop_params only
ever drops what the server adds: parameters the user set are always sent
(issue 12).

What litellm does around each call for its own bookkeeping, the server never
reads (it logs, counts usage and tokens itself: provider.ChunkReader), so two
parts are skipped (issue 17; figures in bench/README.md, branch ``litecall``):
a stream is closed once litellm has handed over its usage chunk, before the
end-of-stream step that only assembles the answer again for litellm's success
callbacks and their cost (see stream; its cache store still runs once, in the
step that produces the usage chunk), and a stream's response metadata
(headers, timings, a cost from the model map) is not computed (see
_leave_streams_unpriced). Neither is skipped when a success callback is
configured, for the process or in a route's litellm_params (_observed): the
operator's Langfuse or Datadog sees every call, priced, as before.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Any, NamedTuple

from app.llm import model_map
from app.llm.interface import ChatRequest, Event, LLMError, TokenCounter, explicit_params
from app.llm.provider import ChunkReader, provider_error
from app.llm.routing import ROUTER_KEYS, Route, resolve_env
from app.observability import logs

INSTALL_HINT = 'pip install "assistants-server[litellm]"'
# Set here, on the main thread, before any import of litellm (which may run
# in a thread of its own: load_off_the_loop): glibc's setenv is not safe
# against another thread's getenv.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def load() -> Any:
    """litellm, imported on first use: offline at import (the variable set
    above), quiet, no telemetry."""
    global _loaded
    # litellm 1.100.5 walks dir() of streamed deltas and so touches pydantic
    # attributes deprecated in pydantic 2.11. Harmless, but where warnings are
    # errors (our test suite) it would abort the stream. Added on every use, not
    # once, because test runners reset the warning filters for each test.
    warnings.filterwarnings("ignore", message=r"Accessing the 'model_\w+' attribute on the instance is deprecated")
    import litellm

    logs.adopt_litellm_loggers()  # its lines once, in our format
    litellm.suppress_debug_info = True
    litellm.telemetry = False
    litellm.disable_hf_tokenizer_download = True  # token_counter must never download a tokenizer
    if not _loaded:  # once: later calls find litellm patched already
        _leave_streams_unpriced()
    _loaded = True  # (imported at start-up too: load_off_the_loop then starts no thread)
    return litellm


def _leave_streams_unpriced() -> None:
    """litellm's ``client`` decorator hands every response, a stream included,
    to ``litellm.utils.update_response_metadata`` before the first chunk is
    read: response headers, timings, and a cost from the model map (about a
    tenth of a streamed call's CPU). Nothing reads a stream's metadata but its
    consumer and litellm's success callbacks; ours does not, so a stream with
    no callback to serve skips it; other responses (embeddings) keep it. The
    decorator looks the function up on the module at each call, which makes
    it the place to wrap. A litellm without it (an upgrade) keeps its own."""
    import litellm.utils
    from litellm.litellm_core_utils.streaming_handler import CustomStreamWrapper

    utils: Any = litellm.utils  # its names are not re-exported for mypy
    original = getattr(utils, "update_response_metadata", None)
    if original is None or getattr(original, "leaves_streams_unpriced", False):
        return

    def update_response_metadata(result: Any, *args: Any, **kwargs: Any) -> None:
        logging_obj = kwargs.get("logging_obj", args[0] if args else None)
        if not isinstance(result, CustomStreamWrapper) or _observed(logging_obj):
            original(result, *args, **kwargs)

    update_response_metadata.leaves_streams_unpriced = True  # type: ignore[attr-defined]
    utils.update_response_metadata = update_response_metadata


def _observed(logging_obj: Any) -> bool:
    """Whether a litellm success callback will see this call: one set for the
    process (``litellm.callbacks``, ``success_callback``: an operator's
    Langfuse, Datadog, a CustomLogger) or for the call (a route's
    ``litellm_params``). Such a call is read to its end and priced, as
    litellm does, so that the callback gets it."""
    litellm = sys.modules.get("litellm")  # imported: this runs inside its calls
    if litellm is not None and (litellm.callbacks or litellm.success_callback or litellm._async_success_callback):
        return True
    return bool(
        getattr(logging_obj, "dynamic_success_callbacks", None)
        or getattr(logging_obj, "dynamic_async_success_callbacks", None)
    )


# The one import of litellm in a worker thread that every first caller
# awaits (see load_off_the_loop); None before it starts or after it failed.
_loading: concurrent.futures.Future[Any] | None = None
_loading_lock = threading.Lock()
_loaded = False


def _load_once() -> concurrent.futures.Future[Any]:
    """The shared import: started by the first caller in a thread of its own;
    a failed one is forgotten, so that the next call tries again."""
    global _loading
    with _loading_lock:
        if _loading is None:
            loading: concurrent.futures.Future[Any] = concurrent.futures.Future()
            loading.set_running_or_notify_cancel()  # a waiter's cancel must not cancel it for the others

            def run() -> None:
                global _loading, _loaded
                try:
                    loading.set_result(load())
                    _loaded = True
                except BaseException as exc:  # handed to every caller
                    with _loading_lock:
                        _loading = None
                    loading.set_exception(exc)

            _loading = loading
            threading.Thread(target=run, name="litellm-import", daemon=True).start()
        return _loading


async def load_off_the_loop(route: Route) -> Any:
    """litellm for a request of a route: imported in a thread of its own the
    first time (about three seconds, during which other runs keep streaming;
    calls meanwhile wait for the same import, never importing on the loop,
    where a half-imported module in sys.modules made them block on the
    import lock), and an LLMError naming the model when it cannot be
    imported.

    Only a name a direct wildcard hands over (routing.Route.handed_to_litellm)
    gets here before litellm is imported: ``LLM.from_config`` imports it at
    start-up for every other route that needs it."""
    if _loaded:
        return load()
    try:
        return await asyncio.wrap_future(_load_once())
    except Exception as exc:
        missing = isinstance(exc, ImportError)
        raise LLMError(
            "server_error",
            f"The model '{route.model}' ({route.target}) needs litellm, which reshapes this model's requests, "
            + (f"but it is not installed ({exc}): {INSTALL_HINT}" if missing else f"but it failed to import: {exc}"),
        ) from exc


async def embed(params: dict[str, Any], texts: Sequence[str]) -> list[list[float]]:
    """Embeddings through litellm's ``aembedding`` for one routing entry's
    ``litellm_params`` (already resolved: ``model`` plus provider options).
    Here because this module is the only one that imports litellm
    (app/retrieval/embed.py chooses the model and batches)."""
    options = dict(params)
    model = options.pop("model")
    response = await load().aembedding(model=model, input=list(texts), **options)
    return [[float(value) for value in item["embedding"]] for item in response.data]


def completion_kwargs(route: Route, request: ChatRequest) -> dict[str, Any]:
    params = _route_params(route, request)
    return _kwargs(request, params, _questions(request, params))


def _kwargs(request: ChatRequest, params: dict[str, Any], questions: list[_Question]) -> dict[str, Any]:
    # Defaults a config may override. drop_params: a parameter the provider does
    # not support is left out rather than failing the run, but only one the
    # server added: allowed_openai_params forwards what the user set, even
    # where litellm's model table says the model lacks it (a user's vLLM
    # serving "gpt-4" honours response_format). timeout: litellm's own
    # default is 6000 s, which would leave a run stuck on a silent provider.
    kwargs: dict[str, Any] = {"drop_params": True, "timeout": 600, **params}
    kwargs.update(messages=request.messages, stream=True, stream_options={"include_usage": True})
    if request.tools:
        kwargs["tools"] = request.tools
        kwargs["parallel_tool_calls"] = request.parallel_tool_calls
        if request.tool_choice is not None:
            kwargs["tool_choice"] = request.tool_choice
    for name in ("temperature", "top_p", "max_tokens", "response_format", "reasoning_effort"):
        value = getattr(request, name)
        if value is not None:
            kwargs[name] = value
    kwargs.update(request.extra)
    forwarded = _untranslated(questions, params)
    if forwarded:
        kwargs["allowed_openai_params"] = forwarded
    return kwargs


def _route_params(route: Route, request: ChatRequest) -> dict[str, Any]:
    return {k: v for k, v in resolve_env(dict(route.params), request.model).items() if k not in ROUTER_KEYS}


def _untranslated(questions: list[_Question], params: dict[str, Any]) -> list[str]:
    """What goes in litellm's ``allowed_openai_params``: the parameters the
    user set that litellm's mapping for the provider does not turn into
    anything (it would drop them), plus the route's own list. litellm adds
    each allowed parameter to the provider's body under its OpenAI name
    wherever its mapping did not produce that name, so one the mapping did
    translate (Anthropic's ``stop`` as ``stop_sequences``,
    ``parallel_tool_calls`` in tool_choice) would be sent twice and refused
    ("Extra inputs are not permitted"). One it ignores (a named tool_choice
    on mistral/, a json_object response_format on Anthropic models,
    temperature on a model without sampling) still reaches the provider,
    whose error then names it (issue 12), as before."""
    forwarded = {question.name for question in questions if not _answer(question)}
    return sorted({*forwarded, *(params.get("allowed_openai_params") or [])})


class _Question(NamedTuple):
    """Does litellm's mapping for this model turn ``name`` = ``value`` (JSON)
    into something of the provider's request? Asked of the mapping itself
    (its parameter lists say what passes its check, not what it sends), once
    per model, parameter and value (a number's kind only, but for temperature
    and top_p: max_tokens is the run's remaining budget, different at every
    call)."""

    target: str
    provider: str | None
    api_base: str | None
    base_model: str | None
    api_version: str | None
    tools: bool
    name: str
    value: str


def _questions(request: ChatRequest, params: dict[str, Any]) -> list[_Question]:
    target, tools = str(params["model"]), bool(request.tools)
    provider, api_base = _text(params.get("custom_llm_provider")), _text(params.get("api_base"))
    base_model, api_version = _text(params.get("base_model")), _text(params.get("api_version"))
    return [
        _Question(target, provider, api_base, base_model, api_version, tools, name, _probe(name, value))
        for name, value in _explicit_values(request).items()
    ]


# The mapping's answers, the least recently used forgotten past the bound
# (its first answer for a provider imports that provider's config: tens of
# milliseconds; a few after). Read on the loop, written from the mapping's
# thread too.
_ANSWERS: OrderedDict[_Question, bool] = OrderedDict()
_ANSWERS_KEPT = 2048
_ANSWERS_LOCK = threading.Lock()
# The mapping's questions are asked on a thread of their own: the loop's
# default executor also parses and embeds files, and a run's first call
# would wait behind them for seconds.
_MAPPING_THREAD = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="litellm-mapping")


def _answer(question: _Question) -> bool:
    with _ANSWERS_LOCK:
        known = _ANSWERS.get(question)
        if known is not None:
            _ANSWERS.move_to_end(question)
            return known
    known = _mapped(question)
    with _ANSWERS_LOCK:
        _ANSWERS[question] = known
        if len(_ANSWERS) > _ANSWERS_KEPT:
            _ANSWERS.popitem(last=False)
    return known


async def _kwargs_off_the_loop(route: Route, request: ChatRequest) -> dict[str, Any]:
    """completion_kwargs, with the mapping's unanswered questions asked on
    its thread: asked on the loop they would hold every other run's stream
    for their milliseconds (the first one of a provider for tens of them)."""
    params = _route_params(route, request)
    questions = _questions(request, params)
    unanswered = [question for question in questions if question not in _ANSWERS]
    if unanswered:
        await asyncio.get_running_loop().run_in_executor(_MAPPING_THREAD, _answer_all, unanswered)
    return _kwargs(request, params, questions)


def _answer_all(questions: list[_Question]) -> None:
    for question in questions:
        _answer(question)


def _explicit_values(request: ChatRequest) -> dict[str, Any]:
    fields = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_tokens": request.max_tokens,
        "response_format": request.response_format,
        "reasoning_effort": request.reasoning_effort,
        "tool_choice": request.tool_choice,
        "parallel_tool_calls": request.parallel_tool_calls,
        **request.extra,
    }
    return {name: fields[name] for name in explicit_params(request)}


def _probe(name: str, value: Any) -> str:
    """The value a _Question asks about, as JSON: a number stands for its kind
    (but temperature's and top_p's, whose value a mapping may look at)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and name not in ("temperature", "top_p"):
        value = type(value)(1)
    return json.dumps(value, sort_keys=True, default=str)


# Keys of litellm's optional parameters that are flags for its own request
# building, never sent as such (Bedrock's Converse drops json_mode and
# _parallel_tool_use_config for most models): a parameter mapped only into
# these reaches no body.
_INTERNAL_FLAGS = frozenset({"json_mode", "fake_stream"})
# A function tool for the mapping's sake: whether it maps tool_choice and
# parallel_tool_calls depends on the request having tools, not on which.
_PROBE_TOOL = {"type": "function", "function": {"name": "probe", "parameters": {"type": "object", "properties": {}}}}


def _sent(optional: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in optional.items() if key not in _INTERNAL_FLAGS and not key.startswith("_")}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _mapped(question: _Question) -> bool:
    """The answer to ``question``: whether litellm's optional parameters
    with the parameter differ from those without it, its own flags aside
    (drop_params on, as litellm_params here have it). False, so that it is
    forwarded as before, when litellm cannot say (a provider it does not
    know, a refusal)."""
    target, provider, api_base, base_model, api_version, tools, name, value = question
    # load()'s set-up (warning filters, our loggers) edits process-wide state
    # not safe from this thread; done already once litellm is loaded.
    litellm = sys.modules["litellm"] if _loaded else load()
    from litellm.utils import get_optional_params

    try:
        model, resolved, _, _ = litellm.get_llm_provider(model=target, custom_llm_provider=provider, api_base=api_base)
        common: dict[str, Any] = {
            "model": model,
            "custom_llm_provider": resolved,
            "base_model": base_model,
            "api_version": api_version,
            "drop_params": True,
            "messages": [],
        }
        if tools:
            common["tools"] = [json.loads(json.dumps(_PROBE_TOOL))]
        without = get_optional_params(**common)
        if tools:
            common["tools"] = [json.loads(json.dumps(_PROBE_TOOL))]  # the mapping may change what it was given
        with_it = get_optional_params(**common, **{name: json.loads(value)})
    except Exception:  # litellm raises bare exceptions for providers and values it does not know
        return False
    return bool(_sent(with_it) != _sent(without))


async def stream(route: Route, request: ChatRequest, llm: TokenCounter) -> AsyncGenerator[Event, None]:
    litellm = await load_off_the_loop(route)
    kwargs = await _kwargs_off_the_loop(route, request)
    try:
        response = await litellm.acompletion(**kwargs)
    except Exception as exc:  # litellm maps every provider failure into its exception family
        raise provider_error(exc, route, explicit_params(request)) from exc
    reader = ChunkReader()
    stop_at_usage = not _observed(getattr(response, "logging_obj", None))
    async with aclosing(response):
        chunks = response.__aiter__()
        while True:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                break
            except Exception as exc:
                raise provider_error(exc, route) from exc
            for event in reader.read(chunk):
                yield event
            if stop_at_usage and getattr(response, "sent_stream_usage", False) is True:
                # litellm builds the usage chunk (asked for with
                # stream_options) itself, once the provider's stream has
                # ended: nothing of the provider's can follow it, and the
                # HTTP response is read to its end. Reading on would only run
                # the end-of-stream step: assembling the whole answer again,
                # then success callbacks and a cost in a task of their own (a
                # fifth of the call's CPU), for callbacks there are none of.
                break
    yield reader.finish(request, llm)


def context_window(target: str) -> int | None:
    """Input tokens of a model in litellm's bundled model map; None if it does not know it."""
    try:
        info = load().get_model_info(target)
    except Exception:  # litellm raises a bare Exception for models it does not know
        return None
    value = info.get("max_input_tokens") or info.get("max_tokens")
    return int(value) if value else None


def count_tokens(target: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    """litellm's count for the model (its tokenizer, else cl100k_base); raises on odd message shapes."""
    return int(
        load().token_counter(model=target, messages=messages, tools=tools or None, use_default_image_token_count=True)
    )


def count_text_tokens(target: str, text: str) -> int:
    return int(load().token_counter(model=target, text=text))


def bundled_window(*names: str) -> int | None:
    """Input tokens of the first of these model names found in litellm's model
    map (read as data, model_map.py); None if it knows none of them. Direct
    routes use it where the routing file sets no max_input_tokens. Not
    cached here: model_map.entry keeps each name's entry, and the LLM keeps
    each model's window (facade.context_window)."""
    for name in filter(None, names):  # a target without a provider prefix has no second name
        info = model_map.entry(name)
        value = info.get("max_input_tokens") or info.get("max_tokens") if info is not None else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
