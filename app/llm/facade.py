"""The facade: every chat completion the server makes goes through ``LLM``,
which routes it to the offline model, a provider adapter or a cassette, and
tells the model-request log and the metrics about it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app import cassettes
from app.llm import anthropic_request, litellm_adapter, offline, tokens, unicode_text
from app.llm.interface import (
    CallObserver,
    ChatRequest,
    Event,
    Exchange,
    Finish,
    LLMConfigError,
    LLMError,
    Usage,
    chat_body,
    event_from_json,
    event_to_json,
)
from app.llm.routing import OFFLINE, Route, Router, read_config
from app.scripting import ScriptBook

if TYPE_CHECKING:
    from app.llm import direct

DEFAULT_CONTEXT_WINDOW = 8_192


# Model names whose context window is kept (LLM.context_window).
WINDOWS_KEPT = 1024


class LLM:
    """Every chat completion the server makes goes through one of these."""

    def __init__(self, router: Router, rules: Sequence[offline.Rule] = ()) -> None:
        self._router = router
        # Rules a test adds at run time (admin API, pytest plugin).
        self.script = ScriptBook()
        # Called with each finished (or failed) completion: the model-request log.
        self.observer: Callable[[Exchange], Awaitable[None]] | None = None
        # Record or replay provider answers (app/cassettes.py).
        self.cassettes: cassettes.Cassettes | None = None
        self._offline = offline.OfflineModel(rules, self.script)
        self._windows: dict[str, int] = {}  # context_window()'s, by model name (at most WINDOWS_KEPT)
        self.metrics_observer: CallObserver | None = None
        # The pooled HTTP client of direct routes (direct.py imports httpx, so
        # only a routing file with direct routes pays for it).
        self._direct: direct.DirectClient | None = None

    @classmethod
    def from_config(cls, path: Path | None, *, replaying: bool = False) -> LLM:
        """None (or a config without model_list) serves every model offline.
        litellm is imported (at start-up, not inside the first run) only if
        some route needs it, and not when ``replaying``: then provider
        answers come from cassettes."""
        if path is None:
            return cls(Router.build(None))
        router, rules = read_config(path)
        if router.needs_litellm() and not replaying:
            _load_litellm_for(router, path)
        llm = cls(router, rules)
        if router.has_direct() and not replaying:
            llm._direct_client()
        return llm

    def _direct_client(self) -> direct.DirectClient:
        if self._direct is None:
            from app.llm import direct  # httpx, imported only where a route is direct

            self._direct = direct.DirectClient()
        return self._direct

    async def aclose(self) -> None:
        """Close the direct routes' connection pool (the Runtime's shutdown)."""
        if self._direct is not None:
            await self._direct.aclose()

    def route(self, model: str) -> Route:
        route = self._router.route(model)
        if route is None:
            raise LLMError(
                "invalid_prompt",
                f"The model '{model}' is not configured on this server: "
                "no model_list entry of the routing config matches it.",
            )
        return route

    def is_configured(self, model: str) -> bool:
        return self._router.route(model) is not None

    def streams(self, model: str) -> bool:
        """Whether ``model``'s answers always come streamed (answer_at_once()
        answers None): its route is configured and is not the offline model
        (a provider's). Known before a run's create is sent, from its model
        alone (Worker.prepare: such a run is started by its create)."""
        route = self._router.route(model)
        return route is not None and not route.offline

    def calls_ahead(self, model: str) -> bool:
        """Whether ``model``'s answer may be asked for before the run it is
        for has committed (execute.take_started on PostgreSQL): a provider's
        over the network, whose wait is worth overlapping with the create's
        commit. Not a cassette's replay: it answers at once, and a request it
        has no recording of (a prompt that would have been rebuilt) fails
        the test that sent it."""
        if self.cassettes is not None and self.cassettes.mode == "replay":
            return False
        return self.streams(model)

    def model_names(self) -> list[str]:
        """Names to list on ``GET /models``: the routing file's exact model
        names, and ``offline`` (the built-in model) when a name routes to it."""
        names = list(self._router.exact)
        if OFFLINE not in names and self.is_configured(OFFLINE):
            names.append(OFFLINE)
        return names

    async def stream(self, request: ChatRequest) -> AsyncIterator[Event]:
        """Deltas as they come, then exactly one Finish; LLMError on any failure.
        Each call is reported to ``metrics_observer`` when it ends."""
        started, outcome, usage = time.monotonic(), "cancelled", None
        try:
            async with aclosing(self._stream(request)) as source:
                async for event in source:
                    if isinstance(event, Finish):
                        outcome, usage = "ok", event.usage
                    yield event
        except LLMError as exc:
            outcome = exc.code
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            self._observe_call(request, outcome, started, usage)

    async def answer_at_once(self, request: ChatRequest) -> list[Event] | None:
        """The whole answer (deltas, then one Finish) when the built-in
        offline model has it at once, recorded and reported as stream()
        does; None when the model must be streamed (any other route, or an
        offline answer cued to take time or fail). LLMError as stream()
        raises it. Lets the executor write an instant answer in one
        transaction instead of opening its message first (issue 17)."""
        started = time.monotonic()
        try:
            route = self.route(request.model)
        except LLMError as exc:  # no such model: reported as stream() reports it
            self._observe_call(request, exc.code, started, None)
            raise
        if not route.offline:
            return None
        exchange = Exchange(request) if self.observer is not None else None
        try:
            prompt_tokens = self._count_tokens(route, request.messages, request.tools)
            events = self._offline.answer(request, prompt_tokens)
        except LLMError as exc:  # a cue the model cannot follow: failed as a stream fails
            if exchange is not None:
                exchange.error = {"code": exc.code, "message": exc.message}
                await self._record(exchange)
            self._observe_call(request, exc.code, started, None)
            raise
        if events is None:
            return None
        events = unicode_text.mended(events)  # the offline model's text may come from the routing file's rules
        finish = events[-1]
        assert isinstance(finish, Finish)
        if exchange is not None:
            for event in events:
                exchange.observe(event)
            await self._record(exchange)
        self._observe_call(request, "ok", started, finish.usage)
        return events

    def _observe_call(self, request: ChatRequest, outcome: str, started: float, usage: Usage | None) -> None:
        if self.metrics_observer is not None:
            self.metrics_observer(request.model, outcome, time.monotonic() - started, usage)

    async def _stream(self, request: ChatRequest) -> AsyncGenerator[Event, None]:
        route = self.route(request.model)
        if route.offline:
            prompt_tokens = self._count_tokens(route, request.messages, request.tools)
            source = self._offline.stream(request, prompt_tokens)
        elif self.cassettes is not None and self.cassettes.mode == "replay":
            source = self._replay(request)
        else:
            source = self._provider_stream(route, request)
            if self.cassettes is not None:
                source = self._recording(request, source, self.cassettes)
        exchange = Exchange(request) if self.observer is not None else None
        # Every model's text is made valid Unicode here, where it enters the
        # server (a provider's lone surrogate: unicode_text.py): what runs
        # store and stream, chat completions and the request log all see it so.
        mender = unicode_text.StreamMender()
        async with aclosing(source):
            try:
                async for event in source:
                    if not mender.clean(event):  # rare: a surrogate half, or one held back
                        mended = mender.mend(event)
                        if not mended:
                            continue  # a lone high half, held for the next delta
                        # A half released as U+FFFD may come first (never a Finish).
                        *released, event = mended
                        for each in released:
                            if exchange is not None:
                                exchange.observe(each)
                            yield each
                    if exchange is not None:
                        exchange.observe(event)
                        if isinstance(event, Finish):
                            # Recorded before the run can finish, so whoever
                            # sees the run ended also sees what the model saw.
                            await self._record(exchange)
                    yield event
            except LLMError as exc:
                if exchange is not None:
                    exchange.error = {"code": exc.code, "message": exc.message}
                    await self._record(exchange)
                raise

    def _provider_stream(self, route: Route, request: ChatRequest) -> AsyncGenerator[Event, None]:
        if route.direct and route.target.startswith(anthropic_request.PREFIX):
            from app.llm import anthropic_messages

            return anthropic_messages.stream(route, request, self, self._direct_client())
        if route.direct:
            from app.llm import direct

            return direct.stream(route, request, self, self._direct_client())
        return litellm_adapter.stream(route, request, self)

    async def _replay(self, request: ChatRequest) -> AsyncGenerator[Event, None]:
        assert self.cassettes is not None
        recorded, why = self.cassettes.lookup(request.model, chat_body(request))
        if recorded is None:
            self.cassettes.misses.append(cassettes.Miss(request.model, why))
            raise LLMError("server_error", why)
        for item in recorded:
            await asyncio.sleep(0)
            yield event_from_json(item)

    async def _recording(
        self, request: ChatRequest, source: AsyncGenerator[Event, None], book: cassettes.Cassettes
    ) -> AsyncGenerator[Event, None]:
        events: list[dict[str, Any]] = []
        async with aclosing(source):
            async for event in source:
                events.append(event_to_json(event))
                if isinstance(event, Finish):
                    book.save(request.model, chat_body(request), events)
                yield event

    async def _record(self, exchange: Exchange) -> None:
        assert self.observer is not None
        try:
            await self.observer(exchange)
        except Exception:  # the log is a diagnostic: it never fails a run
            logging.getLogger("app.llm").exception("could not record a model request")

    def context_window(self, model: str) -> int:
        """Input tokens the model accepts: config, then litellm's model map, then a default."""
        window = self._windows.get(model)
        if window is None:
            window = self._find_window(model)
            if len(self._windows) >= WINDOWS_KEPT:  # runs name their model: any number of names
                self._windows.clear()
            self._windows[model] = window
        return window

    def _find_window(self, model: str) -> int:
        route = self._router.route(model)
        if route is None:
            return DEFAULT_CONTEXT_WINDOW
        configured = route.configured_window()
        if configured:
            return configured
        if route.offline:
            return offline.CONTEXT_WINDOW
        if route.counted_as_direct:
            window = litellm_adapter.bundled_window(route.target, route.target.partition("/")[2])
            return window or DEFAULT_CONTEXT_WINDOW
        return litellm_adapter.context_window(route.target) or DEFAULT_CONTEXT_WINDOW

    def count_tokens(
        self, model: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> int:
        """Prompt tokens, never using the network; exact for the offline model,
        litellm's count for its routes, an estimate for direct routes (tokens.py)."""
        return self._count_tokens(self._router.route(model), messages, tools)

    def _count_tokens(
        self, route: Route | None, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> int:
        """count_tokens() for the route a call already looked up (issue 17:
        a route lookup builds its Route, a dict copy and a pattern match)."""
        if route is not None and route.offline:
            return offline.count_prompt_tokens(messages, tools)
        if route is not None and not route.counted_as_direct:
            with suppress(Exception):  # odd message shapes; fall back to the estimate below
                return litellm_adapter.count_tokens(route.target, messages, tools)
        return tokens.estimate_prompt(messages, tools)

    def count_text_tokens(self, model: str, text: str) -> int:
        route = self._router.route(model)
        if route is None or route.offline:
            return len(offline.tokens(text))
        if not route.counted_as_direct:
            with suppress(Exception):
                return litellm_adapter.count_text_tokens(route.target, text)
        return tokens.estimate_text(text)


def _load_litellm_for(router: Router, path: Path) -> None:
    """litellm at start-up, or an LLMConfigError naming what needs it (each
    entry's model_name and why it is not served directly) and how to do
    without: a bare ModuleNotFoundError named no entry."""
    try:
        litellm_adapter.load()
    except ImportError as exc:
        needs = "; ".join(router.why_litellm())
        raise LLMConfigError(
            f"{path}: litellm is not installed ({exc}), and these routes need it: {needs}. "
            f"Install it ({litellm_adapter.INSTALL_HINT}), or make each entry one the direct path "
            "serves: remove the litellm_params it names (litellm leaves user, metadata and "
            "reasoning_effort out for these providers), or its direct: false."
        ) from exc
