"""The direct adapter: OpenAI-compatible routes served by one streamed HTTP
request of our own, without litellm (routing.py says which routes).

Through litellm a 5-word streamed answer cost about 9 ms of CPU in its
wrappers, per-chunk objects and end-of-stream bookkeeping, and importing it
150 MiB (bench/README.md, issue 17). Here the request is
``POST {api_base}/chat/completions`` (Azure: its deployment URL) with ``stream: true`` and
``stream_options.include_usage``; the Server-Sent Events are read line by line
into the same events as litellm's chunks (provider.ChunkReader).

It keeps litellm's behaviour where a user could tell the difference:

- the URL, the key and its header: ``api_key`` (``os.environ/NAME`` resolved
  per call), else the provider's variables (providers.py: ``OPENAI_API_KEY``
  for ``openai/``, ``AZURE_API_KEY`` and Azure's ``api-key`` header, ...);
  without one no Authorization header is sent;
- ``timeout`` (default 600 s) bounds connecting and each read, as the openai
  SDK under litellm does; ``max_retries`` (default 2) retries a refused,
  dropped or timed-out connection and 408/409/429/5xx answers before any
  output, after the server's ``Retry-After`` (up to 60 s) or 0.5 s doubling
  to 8 s; no call is ever sent more than ``max_retries`` + 1 times (neither
  client resends a written request on its own);
- failures become the LLMError litellm's would (provider.provider_error):
  the same codes and texts (tests/runner/test_direct.py pins each).

Each event loop has its pooled clients (DirectClient): ``http://`` bases
without a proxy go by our own keep-alive client (plain_http.py, a fraction
of httpx's CPU per completion), the rest by an ``httpx.AsyncClient``;
``LLM.aclose`` (the Runtime's shutdown) closes them.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Protocol

from app.llm import plain_http, providers
from app.llm.interface import ChatRequest, Event, LLMError, TokenCounter, chat_body, explicit_params
from app.llm.provider import ChunkReader, ProviderFailure, provider_error
from app.llm.routing import Route, resolve_env
from app.wire import jsontext

if TYPE_CHECKING:
    import httpx

DEFAULT_TIMEOUT = 600.0  # litellm's own default is 6000 s: a silent provider would hold a run for 100 minutes
DEFAULT_MAX_RETRIES = 2  # the openai SDK's, which litellm uses
_RETRY_STATUSES = frozenset({408, 409, 429})
_MAX_RETRY_AFTER = 60.0
_ERROR_BODY_CHARS = 500
# litellm's words (and status codes) for failures that have no HTTP answer.
_TIMED_OUT = (408, "Request timed out.")
_CONNECTION = (500, "Connection error.")
_AZURE_INTERNAL = "Internal server error"


class StreamedResponse(Protocol):
    """What direct.py reads of an answer: httpx.Response, or plain_http.Response
    (header names looked up in lower case)."""

    @property
    def status_code(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def is_success(self) -> bool: ...
    async def aread(self) -> bytes: ...
    def aiter_lines(self) -> AsyncIterator[str]: ...
    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class Failures:
    """The errors of either client that the except clauses here catch,
    widest last (a timeout is a transport error in both)."""

    timeouts: tuple[type[Exception], ...]
    transport: tuple[type[Exception], ...]
    http: tuple[type[Exception], ...]
    invalid_url: tuple[type[Exception], ...]  # httpx's alone: plain_http leaves such URLs to it


# plain_http's; httpx's joined once an httpx client was made (_new_httpx_client).
_FAILURES = [Failures((plain_http.TimeoutException,), (plain_http.TransportError,), (plain_http.HTTPError,), ())]


def failures() -> Failures:
    """plain_http's errors, and httpx's once this module has made an httpx
    client: httpx is imported for the first call that needs it (https://, a
    proxy), not at start-up (~100 modules, 4-6 MiB of an idle server whose
    routes are all plain http://, bench/README.md), and until its client
    exists none of its errors can reach an except clause here. Read where
    such a clause is reached, so only on a failure."""
    return _FAILURES[-1]


def _new_httpx_client() -> httpx.AsyncClient:
    import httpx

    if len(_FAILURES) == 1:
        _FAILURES.append(
            Failures(
                (httpx.TimeoutException, plain_http.TimeoutException),
                (httpx.TransportError, plain_http.TransportError),
                (httpx.HTTPError, plain_http.HTTPError),
                (httpx.InvalidURL,),
            )
        )
    return httpx.AsyncClient(  # no overall cap, as the plain pool (_LoopClients)
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=100)
    )


class DirectClient:
    """The pooled HTTP clients of direct routes, one set per event loop
    (pooled connections belong to the loop that opened them; the process may
    run several, as a server in a thread beside a test's loop does).

    An ``http://`` URL that no proxy applies to goes by plain_http (our own
    keep-alive client: 0.2 ms of CPU per streamed completion against httpx's
    1.1, bench/README.md); anything else by httpx (TLS, proxies and the rest
    plain_http.py lists)."""

    def __init__(self) -> None:
        self._loops: dict[asyncio.AbstractEventLoop, _LoopClients] = {}

    def here(self) -> _LoopClients:
        loop = asyncio.get_running_loop()
        clients = self._loops.get(loop)
        if clients is None:
            for gone in [other for other in self._loops if other.is_closed()]:
                del self._loops[gone]  # nothing left to close on a closed loop
            clients = self._loops[loop] = _LoopClients()
        return clients

    async def aclose(self) -> None:
        """Close this loop's clients (the server's shutdown). Another loop's
        connections are that loop's to close (a server in another thread
        shuts down on its own loop), as sandbox managers' sessions are."""
        mine = self._loops.pop(asyncio.get_running_loop(), None)
        if mine is not None:
            await mine.aclose()


class _LoopClients:
    """One event loop's clients: the plain pool, and httpx made on first need
    (a routing file of http:// bases never imports httpx or builds its TLS
    context)."""

    def __init__(self) -> None:
        # No overall pool cap: the worker's concurrency already bounds the
        # streams; keep-alive connections make a run's request cheap.
        self.plain = plain_http.Pool()  # Limits(): no cap, 100 kept alive
        self.proxies = plain_http.ProxyEnvironment.read()  # read once, as httpx reads it once per client
        self._targets: dict[str, plain_http.Target | None] = {}
        self._httpx: httpx.AsyncClient | None = None
        self._httpx_made: asyncio.Future[httpx.AsyncClient] | None = None
        self._closed = False
        self._closing: asyncio.Future[None] | None = None  # closing a client made after aclose()

    def plain_target(self, url: str) -> plain_http.Target | None:
        """Where plain_http sends ``url``, or None for httpx."""
        if url not in self._targets:
            if len(self._targets) > 1024:  # URLs come from the routing file: a handful
                self._targets.clear()
            target = plain_http.plain_target(url)
            if target is not None and self.proxies.applies_to(target.host):
                target = None
            self._targets[url] = target
        return self._targets[url]

    async def httpx_client(self) -> httpx.AsyncClient:
        """The httpx client, made for the first call plain_http does not
        take, in a thread: importing httpx and building its TLS context take
        a tenth of a second or more, which the loop's other streams do not
        wait for (calls meanwhile wait for the same one)."""
        if self._httpx is None:
            if self._httpx_made is None:
                self._httpx_made = asyncio.ensure_future(asyncio.to_thread(_new_httpx_client))
                self._httpx_made.add_done_callback(self._made)
            self._httpx = await asyncio.shield(self._httpx_made)
        return self._httpx

    def _made(self, made: asyncio.Future[httpx.AsyncClient]) -> None:
        # A failed making (a transient EMFILE reading the CA bundle, say)
        # fails the calls waiting for it; the next call tries again, as
        # each call did when the client was made at start-up.
        if made.cancelled() or made.exception() is not None:
            if self._httpx_made is made:
                self._httpx_made = None
        elif self._closed:
            # Made after aclose(): nothing would close it otherwise.
            self._closing = asyncio.ensure_future(made.result().aclose())

    async def send(self, call: Call) -> StreamedResponse:
        """POST the call; the answer once its head arrived (the body is read from it)."""
        target = self.plain_target(call.url)
        if target is not None:
            return await self.plain.request(target, call.headers, call.body, plain_http.Timeouts.uniform(call.timeout))
        client = await self.httpx_client()
        # (A number is httpx.Timeout(number) to build_request.)
        request = client.build_request("POST", call.url, headers=call.headers, content=call.body, timeout=call.timeout)
        return await client.send(request, stream=True)

    async def aclose(self) -> None:
        self._closed = True
        self.plain.close()
        made = self._httpx_made
        if made is not None and made.done() and not made.cancelled() and made.exception() is None:
            await made.result().aclose()


@dataclass(frozen=True)
class Call:
    """One completion request as sent: URL, headers, body and the route's limits."""

    url: str
    headers: Mapping[str, str]
    body: bytes
    timeout: float
    max_retries: int

    @classmethod
    def build(cls, route: Route, request: ChatRequest) -> Call:
        params = resolve_env(dict(route.params), request.model)
        where = providers.endpoint(route.target, params)  # the provider's URL, credentials and model name
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **where.headers}
        headers.update({str(name): str(value) for name, value in (params.get("extra_headers") or {}).items()})
        # The route's OpenAI parameters are defaults; what the request sets wins.
        body = {name: value for name, value in params.items() if name in providers.BODY_KEYS}
        body.update(chat_body(request))
        body.update(model=where.model, stream=True, stream_options={"include_usage": True})
        body.update(params.get("extra_body") or {})
        if not request.tools:  # as through litellm: providers refuse these without tools
            body.pop("tool_choice", None)
            body.pop("parallel_tool_calls", None)
        timeout, max_retries = call_limits(params, headers, DEFAULT_MAX_RETRIES)
        return cls(
            url=where.url,
            headers=headers,
            # orjson's compact text (jsontext.dumps), as the run log and the
            # stored rows are written: the same JSON to the provider but for the
            # differences jsontext's docstring lists (spaces, U+2028 escaped,
            # NaN and the infinities as null), for a third to a half of
            # Call.build's CPU (most on a long thread's prompt; bench/README.md,
            # branch dircpu).
            body=jsontext.dumps(body).encode(),
            timeout=timeout,
            max_retries=max_retries,
        )


def call_limits(params: Mapping[str, Any], headers: Mapping[str, str], default_retries: int) -> tuple[float, int]:
    """The route's ``timeout`` (default 600 s) and ``max_retries`` (default
    ``default_retries``), after checking them and the request's headers;
    ValueError or TypeError names what is not usable."""
    for name, value in headers.items():
        # HTTP header values are ASCII: a typographic quote pasted into a
        # key failed in the client's encoder (a raw UnicodeEncodeError, on
        # both clients). Named, not shown: the value may be a key.
        if not (name.isascii() and value.isascii()):
            raise ValueError(f"the header {name.encode('ascii', 'replace').decode()} is not ASCII")
    timeout = float(params.get("timeout") or DEFAULT_TIMEOUT)
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout {timeout} is not a positive number of seconds")
    retries = params.get("max_retries")
    return timeout, default_retries if retries is None else max(0, int(retries))


async def stream(
    route: Route, request: ChatRequest, counter: TokenCounter, client: DirectClient
) -> AsyncGenerator[Event, None]:
    """Deltas as they arrive, then one Finish; LLMError on any failure."""
    try:
        call = Call.build(route, request)
    except (ValueError, TypeError) as exc:  # e.g. timeout "30s", or an api_base from the environment (no httpx here)
        raise unusable(route, exc) from exc
    reader = ChunkReader()
    async with opened(call, client.here(), route, explicit_params(request)) as response:
        with reading(route):
            if _is_json(response):  # a server that ignores ``stream``: its whole answer at once
                body = (await response.aread()).decode("utf-8", "replace")
                for event in reader.read(_as_chunk(_chunk(body))):
                    yield event
            else:
                done = False
                # Read to the end, past [DONE] (as the openai SDK does): a body read
                # to its end leaves the connection in the pool for the next run.
                async for data in sse_data(response):
                    done = done or data == "[DONE]"
                    if not done:
                        for event in reader.read(_chunk(data)):
                            yield event
    yield reader.finish(request, counter)


@contextmanager
def reading(route: Route) -> Iterator[None]:
    """A failure while reading a streamed answer as litellm reports it."""
    try:
        yield
    except failures().timeouts as exc:
        raise provider_error(ProviderFailure(*_TIMED_OUT), route) from exc
    except failures().transport as exc:  # the connection broke mid-stream
        raise provider_error(ProviderFailure(*_CONNECTION), route) from exc
    except failures().http as exc:  # e.g. a body its content-encoding cannot decode
        raise provider_error(ProviderFailure(500, str(exc) or type(exc).__name__), route) from exc
    except (ValueError, TypeError, AttributeError, KeyError) as exc:  # a chunk that is not JSON, or not its shape
        raise provider_error(ProviderFailure(500, str(exc)), route) from exc
    except ProviderFailure as exc:  # an error the server streamed in place of a chunk
        raise provider_error(exc, route) from exc


def unusable(route: Route, exc: Exception) -> LLMError:
    return LLMError(
        "server_error", f"The routing entry for model '{route.model}' ({route.target}) is not usable: {exc}"
    )


@asynccontextmanager
async def opened(
    call: Call,
    clients: _LoopClients,
    route: Route,
    explicit: Sequence[str],
    read_failure: Callable[[StreamedResponse], Awaitable[ProviderFailure]] | None = None,
) -> AsyncIterator[StreamedResponse]:
    """The streamed response once it answered 2xx, after the retries its failures allow.
    ``read_failure`` reads an error answer in the provider's terms (default: OpenAI's)."""
    for attempt in range(call.max_retries + 1):
        last = attempt == call.max_retries
        try:
            response = await clients.send(call)
        except failures().invalid_url as exc:  # a URL httpx cannot send either (a port "²", say)
            raise unusable(route, exc) from exc
        except failures().timeouts as exc:
            if last:
                raise provider_error(ProviderFailure(*_TIMED_OUT), route) from exc
            await asyncio.sleep(_backoff(attempt, None))
            continue
        except failures().transport as exc:
            if last:
                raise provider_error(ProviderFailure(*_CONNECTION), route) from exc
            await asyncio.sleep(_backoff(attempt, None))
            continue
        if response.is_success:
            try:
                yield response
            finally:
                await response.aclose()
            return
        if read_failure is not None:
            failure = await read_failure(response)
        else:
            failure = await _failure(response, azure=route.target.startswith(providers.AZURE_PREFIX))
        if last or not _retryable(response):
            raise provider_error(failure, route, explicit) from failure
        await asyncio.sleep(_backoff(attempt, response.headers))


async def _failure(response: StreamedResponse, *, azure: bool) -> ProviderFailure:
    """An error answer in litellm's terms: the body's error message, else the body itself."""
    try:
        body = (await response.aread()).decode("utf-8", "replace")
    except failures().http:
        body = ""
    finally:
        await response.aclose()
    message = _error_message(response.status_code, body)
    if azure and _AZURE_INTERNAL in body:
        # litellm reports every Azure answer that says so as its 500 "Internal server error - <message>".
        return ProviderFailure(500, f"{_AZURE_INTERNAL} - {message}")
    return ProviderFailure(response.status_code, message)


def _error_message(status: int, body: str) -> str:
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        # vLLM and others answer {"object": "error", "message": ...} without the envelope.
        message = message or parsed.get("message")
        if isinstance(message, str) and message:
            return message
    shown = body.strip()[:_ERROR_BODY_CHARS]
    return f"Error code: {status}" + (f" - {shown}" if shown else "")


def _retryable(response: StreamedResponse) -> bool:
    verdict = str(response.headers.get("x-should-retry", ""))  # OpenAI's own hint, as its SDK reads it
    if verdict in ("true", "false"):
        return verdict == "true"
    return response.status_code in _RETRY_STATUSES or response.status_code >= 500


def _backoff(attempt: int, headers: Mapping[str, str] | None) -> float:
    """The server's Retry-After if it gives a sane one, else 0.5 s doubling to 8 s, less up to a quarter."""
    wait = _retry_after(headers) if headers is not None else None
    if wait is not None:
        return wait
    return min(0.5 * 2.0**attempt, 8.0) * (1 - 0.25 * random.random())  # noqa: S311 (jitter, not security)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    seconds: float | None = None
    if "retry-after-ms" in headers:
        try:
            seconds = float(headers["retry-after-ms"]) / 1000
        except ValueError:
            seconds = None
    elif "retry-after" in headers:
        value = headers["retry-after"]
        try:
            seconds = float(value)
        except ValueError:
            try:  # an HTTP date
                seconds = parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError):
                seconds = None
    return seconds if seconds is not None and 0 <= seconds <= _MAX_RETRY_AFTER else None


def _is_json(response: StreamedResponse) -> bool:
    media_type = str(response.headers.get("content-type", "")).partition(";")[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def _as_chunk(completion: dict[str, Any]) -> dict[str, Any]:
    """A whole ``chat.completion`` as the one chunk that carries all of it:
    each choice's ``message`` as its ``delta`` (tool calls numbered in order,
    as chunks number them), with its finish_reason and the usage.

    Some OpenAI-compatible servers answer ``stream: true`` with a plain JSON
    completion. The openai SDK (and so litellm) finds no events in it and
    reports an empty answer; the answer is there, so it is read."""
    choices = []
    for choice in completion.get("choices") or []:
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        calls = message.get("tool_calls")
        delta = dict(message)
        if isinstance(calls, list):
            delta["tool_calls"] = [
                {**call, "index": index} if isinstance(call, dict) else call for index, call in enumerate(calls)
            ]
        choices.append({**choice, "delta": delta})
    return {"choices": choices, "usage": completion.get("usage")}


async def sse_data(response: StreamedResponse) -> AsyncIterator[str]:
    """The ``data`` of each Server-Sent Event (several data lines joined by newlines)."""
    data: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield "\n".join(data)
                data = []
        elif line.startswith("data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(" ") else value)
        # event:, id:, retry: and ": comments" carry nothing a completion needs
    if data:
        yield "\n".join(data)


def _chunk(data: str) -> Any:
    """One chunk's JSON; an error object streamed in place of a chunk raises it.
    Read as the stdlib reads it, by orjson where that is the same (issue 17:
    one parse per streamed token, in well under half the stdlib's time)."""
    chunk = jsontext.loads(data)
    if not isinstance(chunk, dict):
        raise ProviderFailure(500, f"malformed chunk: {data[:_ERROR_BODY_CHARS]}")
    error = chunk.get("error")
    if error:
        message = error.get("message") if isinstance(error, dict) else str(error)
        code = error.get("code") if isinstance(error, dict) else None
        raise ProviderFailure(code if isinstance(code, int) else 500, str(message or error))
    return chunk
