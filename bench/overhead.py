"""Run overhead against the direct-to-model floor, in one run (issue 17).

Three processes: this client, an instant OpenAI-compatible model stub (the
one in bench/streaming.py, no delay between tokens) and the server
(``python -m app serve``, API and embedded worker in one process), on SQLite
and on an embedded PostgreSQL. The routing file sends ``gpt-4o`` to the stub
by the server's own HTTP request (app/llm/direct.py), ``litellm-bench`` to the
same stub through litellm (``direct: false``), ``azure-bench`` to it as an
Azure OpenAI deployment (``azure/``: direct since branch ``routes``) and
``offline-bench`` to the built-in offline model.

Measured, each as p50/p95 over sequential requests:

* floor: a streamed chat completion sent straight to the stub, read to its end;
* stream: ``POST /v1/threads/runs`` with ``stream: true`` until
  ``thread.run.completed`` (through litellm, and with the offline model);
* poll: what ``runs.create_and_poll`` does: the POST, then ``GET`` of the run
  (with the SDK's ``X-Stainless-Poll-Helper`` header) until it is terminal,
  sleeping ``openai-poll-after-ms`` between polls; the polls per run too;
* stream / poll on a thread: the same for a run on an existing thread (the
  SDK's usual flow: ``threads.create`` with one user message first, not
  timed, then ``POST /v1/threads/{id}/runs``; ``--modes``);

then runs/s with 1, 16 and 64 clients doing runs back to back, polling as
the SDK does or streaming, for each path (``--paths``), the server's CPU per
run, and its RSS at the end of the load; last, the idle RSS of a server
started with each routing file alone (offline only, direct routes only, a
route through litellm). Prints markdown; asserts nothing.

    .venv/bin/python bench/overhead.py                      # both databases, about 4 minutes
    .venv/bin/python bench/overhead.py --db sqlite --runs 100 --duration 3 --clients 1,16
    .venv/bin/python bench/overhead.py --call-path 300      # the provider call path alone, in-process

``--call-path`` also sends an ``anthropic/`` route to an Anthropic Messages
stub (``--anthropic-stub PORT``, this script in a child process), directly
(app/llm/anthropic_messages.py, since branch ``anthropic``) and through
litellm (``direct: false``). ``--idle-only`` measures the idle RSS alone,
a server whose routing file has only anthropic/ routes among them.
``--paths ...,anthropic`` adds runs on an anthropic/ route to that stub.

    .venv/bin/python bench/overhead.py --idle-only
    .venv/bin/python bench/overhead.py --db sqlite --paths direct,anthropic
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runs as base

REPO = base.REPO
# The working tree whose app the server runs (--tree): its own directory and
# PYTHONPATH. A bench script of one tree run against another tree's app must
# say so here: `python -m app` imports the app of its working directory first,
# whatever PYTHONPATH says, so cd-ing elsewhere and setting PYTHONPATH still
# served this script's tree.
SERVED_TREE = REPO
TERMINAL = {"completed", "failed", "cancelled", "expired", "incomplete", "requires_action"}
TOKENS = 5  # words in every answer
TOKEN_GAP_MS = 0.0  # the stub's wait before each word (0: the whole answer at once, read in one go)


class Client(base.Connection):
    """The keep-alive client of bench/runs.py, with headers and streamed bodies."""

    async def call(self, method: str, path: str, body: Any = None, headers: str = "") -> tuple[dict[str, str], bytes]:
        if self.writer is None:
            await self._connect()
        assert self.reader is not None and self.writer is not None
        payload = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"OpenAI-Beta: assistants=v2\r\nContent-Type: application/json\r\n{headers}"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode()
        self.writer.write(head + payload)
        status, response_headers = await self._read_head()
        data = await self._read_body(response_headers)
        if response_headers.get("connection", "").lower() == "close":
            await self.close()
        if not 200 <= status < 300:
            raise base.HTTPError(f"{method} {path} -> {status}: {data[:300]!r}")
        return response_headers, data


@dataclass
class Sample:
    seconds: float
    polls: int = 0
    done_at: float = 0.0


def _run_body(model: str, text: str, stream: bool) -> dict[str, Any]:
    return {
        "assistant_id": "",  # filled in by the caller
        "model": model,
        "stream": stream,
        "thread": {"messages": [{"role": "user", "content": text}]},
    }


async def floor_once(client: Client) -> Sample:
    body = {"model": "bench", "stream": True, "messages": [{"role": "user", "content": "Hello"}]}
    started = time.perf_counter()
    _, data = await client.call("POST", "/v1/chat/completions", body)
    assert data.rstrip().endswith(b"[DONE]"), data[-200:]
    return Sample(time.perf_counter() - started)


async def stream_once(client: Client, assistant_id: str, model: str, text: str) -> Sample:
    body = {**_run_body(model, text, True), "assistant_id": assistant_id}
    started = time.perf_counter()
    _, data = await client.call("POST", "/v1/threads/runs", body)
    _completed(data)
    return Sample(time.perf_counter() - started, done_at=time.monotonic())


async def poll_once(client: Client, assistant_id: str, model: str, text: str) -> Sample:
    """runs.create_and_poll as the Python SDK does it."""
    body = {**_run_body(model, text, False), "assistant_id": assistant_id}
    started = time.perf_counter()
    _, data = await client.call("POST", "/v1/threads/runs", body)
    polls, _run = await _polled(client, json.loads(data))
    return Sample(time.perf_counter() - started, polls, time.monotonic())


async def thread_with(client: Client, text: str) -> str:
    """A thread with one user message, as ``threads.create`` makes it (not timed)."""
    _, data = await client.call("POST", "/v1/threads", {"messages": [{"role": "user", "content": text}]})
    return str(json.loads(data)["id"])


async def stream_on_thread_once(client: Client, assistant_id: str, model: str, text: str) -> Sample:
    """The SDK's usual flow, streamed: ``runs.stream(thread_id=...)`` on a thread made first."""
    return await stream_on(client, assistant_id, model, await thread_with(client, text))


async def poll_on_thread_once(client: Client, assistant_id: str, model: str, text: str) -> Sample:
    """The SDK's usual flow: ``runs.create_and_poll(thread_id=...)`` on a thread made first."""
    return await poll_on(client, assistant_id, model, await thread_with(client, text))


async def stream_on(client: Client, assistant_id: str, model: str, thread_id: str) -> Sample:
    """A run on ``thread_id`` streamed to its end."""
    started = time.perf_counter()
    body = {"assistant_id": assistant_id, "model": model, "stream": True}
    _, data = await client.call("POST", f"/v1/threads/{thread_id}/runs", body)
    _completed(data)
    return Sample(time.perf_counter() - started, done_at=time.monotonic())


async def poll_on(client: Client, assistant_id: str, model: str, thread_id: str) -> Sample:
    """A run on ``thread_id`` created and polled as the SDK's create_and_poll does."""
    started = time.perf_counter()
    body = {"assistant_id": assistant_id, "model": model, "stream": False}
    _, data = await client.call("POST", f"/v1/threads/{thread_id}/runs", body)
    polls, _run = await _polled(client, json.loads(data))
    return Sample(time.perf_counter() - started, polls, time.monotonic())


# The function tool_poll_once's runs offer (the offline model calls it when told to).
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


async def tool_poll_once(client: Client, assistant_id: str, model: str, text: str) -> Sample:
    """A function call answered as the SDK's ``submit_tool_outputs_and_poll``
    does it. Untimed first: a new thread and run, told to call a function
    (the offline model only: ``[[call get_weather]]``), polled until it waits
    in ``requires_action``. Timed: the outputs' POST, then the polls until
    the run has completed (its answer read from the tool's output)."""
    run = await waiting_for_call(client, assistant_id, model, text)
    started = time.perf_counter()
    polls = await answer_call(client, run)
    return Sample(time.perf_counter() - started, polls, time.monotonic())


async def waiting_for_call(client: Client, assistant_id: str, model: str, text: str) -> dict[str, Any]:
    """A new thread and run told to call a function, once it waits in ``requires_action``."""
    body = {**_run_body(model, f"{text} [[call get_weather]]", False), "assistant_id": assistant_id}
    body["tools"] = [WEATHER_TOOL]
    _, data = await client.call("POST", "/v1/threads/runs", body)
    run = json.loads(data)
    path = f"/v1/threads/{run['thread_id']}/runs/{run['id']}"
    while run["status"] != "requires_action":
        if run["status"] in TERMINAL:
            raise base.HTTPError(f"run ended {run['status']} before its call: {run.get('last_error')}")
        await asyncio.sleep(0.001)
        _, data = await client.call("GET", path)
        run = json.loads(data)
    return run


async def answer_call(client: Client, run: dict[str, Any]) -> int:
    """``run``'s function calls answered (``submit_tool_outputs``), then its
    polls until it has completed: how many polls."""
    path = f"/v1/threads/{run['thread_id']}/runs/{run['id']}"
    outputs = [
        {"tool_call_id": call["id"], "output": "sunny"}
        for call in run["required_action"]["submit_tool_outputs"]["tool_calls"]
    ]
    _, data = await client.call("POST", f"{path}/submit_tool_outputs", {"tool_outputs": outputs})
    polls, _run = await _polled(client, json.loads(data))
    return polls


def _completed(data: bytes) -> None:
    if b"event: thread.run.completed" not in data:
        raise base.HTTPError(f"stream did not complete: {data[-300:]!r}")


async def _polled(client: Client, run: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The SDK's polls of a run just created, until it is terminal: how many, and the run."""
    path = f"/v1/threads/{run['thread_id']}/runs/{run['id']}"
    polls, interval = 0, None
    while True:
        headers, data = await client.call("GET", path, headers="X-Stainless-Poll-Helper: true\r\n")
        polls += 1
        run = json.loads(data)
        if run["status"] in TERMINAL:
            break
        if interval is None:
            interval = int(headers.get("openai-poll-after-ms", "1000")) / 1000
        await asyncio.sleep(interval)
    if run["status"] != "completed":
        raise base.HTTPError(f"run ended {run['status']}: {run.get('last_error')}")
    return polls, run


def pct(samples: list[Sample], q: float) -> float:
    values = sorted(sample.seconds for sample in samples)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


async def sequential(port: int, count: int, once: Any) -> list[Sample]:
    client = Client("127.0.0.1", port)
    try:
        for _ in range(max(5, count // 10)):  # warm-up
            await once(client, -1)
        return [await once(client, i) for i in range(count)]
    finally:
        await client.close()


@dataclass
class Load:
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    peak_rss: float = 0.0
    cpu: float = 0.0
    database_cpu: float = 0.0  # PostgreSQL's backends (0 on SQLite)
    client_cpu: float = 0.0  # this process's (the bench clients'), to tell whether they bound runs/s
    # `serve --workers N`: each serving process's share of the server's CPU
    # (one process doing most of the work leaves the second core idle).
    shares: list[float] = field(default_factory=list)


async def load(
    port: int, pid: int, clients: int, duration: float, warmup: float, once: Any, database_pid: int | None = None
) -> Load:
    result = Load()
    begin = time.monotonic()
    window, stop = begin + warmup, begin + warmup + duration

    async def client_loop(index: int) -> None:
        client = Client("127.0.0.1", port)
        n = 0
        try:
            while time.monotonic() < stop:
                n += 1
                try:
                    result.samples.append(await once(client, index * 100_000 + n))
                except (base.HTTPError, OSError, asyncio.IncompleteReadError) as error:
                    result.errors.append(str(error)[:200])
                    await client.close()
        finally:
            await client.close()

    tasks = [asyncio.create_task(client_loop(i)) for i in range(clients)]
    await asyncio.sleep(max(0.0, window - time.monotonic()))
    # The server and its children: the serving processes of `serve --workers N`.
    cpu_before = base.tree_cpu(pid)
    children_before = _children_cpu(pid)
    database_before = base.tree_cpu(database_pid) if database_pid else 0.0
    client_before = time.process_time()
    while time.monotonic() < stop:
        result.peak_rss = max(result.peak_rss, rss_mib(pid))
        await asyncio.sleep(0.2)
    result.cpu = base.tree_cpu(pid) - cpu_before
    children_after = _children_cpu(pid)
    used = {child: cpu - children_before[child] for child, cpu in children_after.items() if child in children_before}
    if len(used) > 1 and result.cpu > 0:
        result.shares = sorted((cpu / result.cpu for cpu in used.values() if cpu > 0.01 * result.cpu), reverse=True)
    result.client_cpu = time.process_time() - client_before
    result.database_cpu = base.tree_cpu(database_pid) - database_before if database_pid else 0.0
    await asyncio.gather(*tasks)
    result.samples = [s for s in result.samples if window <= s.done_at <= stop]
    return result


def rss_mib(pid: int) -> float:
    """VmRSS of the server and its children (`serve --workers N`'s processes), summed."""
    total = 0.0
    for process in [pid, *_children(pid)]:
        with contextlib.suppress(OSError, StopIteration):
            status = Path(f"/proc/{process}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024
    return total


def _children_cpu(pid: int) -> dict[int, float]:
    """CPU seconds so far of each child process of the server."""
    found = {}
    for child in _children(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            found[child] = base.process_cpu(child)[1]
    return found


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if base.process_cpu(int(entry.name))[0] == pid:
                    found.append(int(entry.name))
    return found


@contextmanager
def stub(scratch: Path) -> Iterator[int]:
    port = base.free_port()
    command = [sys.executable, str(REPO / "bench" / "streaming.py"), "backend", "--port", str(port)]
    process = subprocess.Popen([*command, "--delay-ms", str(TOKEN_GAP_MS), "--tokens", str(TOKENS)], cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                asyncio.run(floor_once(Client("127.0.0.1", port)))
                break
            except OSError:
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=15)


def _anthropic_answer() -> bytes:
    """A streamed Messages answer of TOKENS words, as Anthropic's SSE events."""
    message = {
        "id": "msg_bench", "type": "message", "role": "assistant", "model": "claude-bench", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 1},
    }  # fmt: skip
    words = [{"index": 0, "delta": {"type": "text_delta", "text": f" word{i}"}} for i in range(TOKENS)]
    end = {"delta": {"stop_reason": "end_turn", "stop_sequence": None}, "usage": {"output_tokens": TOKENS}}
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"message": message}),
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        *[("content_block_delta", word) for word in words],
        ("content_block_stop", {"index": 0}),
        ("message_delta", end),
        ("message_stop", {}),
    ]
    return b"".join(f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode() for kind, data in events)


async def anthropic_stub(port: int) -> None:
    """Answers every POST on a keep-alive connection with the same streamed Messages answer."""
    body = _anthropic_answer()
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % len(body)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while headers := await reader.readuntil(b"\r\n\r\n"):
                length = next((int(line.split(b":")[1]) for line in headers.lower().split(b"\r\n")
                               if line.startswith(b"content-length:")), 0)  # fmt: skip
                await reader.readexactly(length)
                writer.write(head + body)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


MODELS = {
    "direct": "gpt-4o",
    "litellm": "litellm-bench",
    "azure": "azure-bench",
    "offline": "offline-bench",
    "anthropic": "claude-bench",
}


def routing(stub_port: int, paths: list[str], anthropic_port: int = 0) -> list[dict[str, Any]]:
    """Routing entries for the paths: the stub directly, through litellm, as an Azure deployment, the offline
    model; ``anthropic``: an anthropic/ route to the Anthropic stub on ``anthropic_port``."""
    stub = {"api_base": f"http://127.0.0.1:{stub_port}/v1", "api_key": "x", "max_retries": 0}
    azure = {**stub, "api_base": f"http://127.0.0.1:{stub_port}", "api_version": "2024-10-21"}
    entries: dict[str, dict[str, Any]] = {
        "offline": {"model_name": "offline-bench", "litellm_params": {"model": "offline"}},
        "litellm": {
            "model_name": "litellm-bench",
            "litellm_params": {"model": "openai/litellm-bench", **stub},
            "direct": False,
        },
        "azure": {"model_name": "azure-bench", "litellm_params": {"model": "azure/azure-bench", **azure}},
        "direct": {"model_name": "*", "litellm_params": {"model": "openai/*", **stub}},
    }
    chosen = [entries[path] for path in ("offline", "litellm", "azure", "direct") if path in paths]
    return chosen + anthropic_routes(anthropic_port)[:1] if "anthropic" in paths else chosen


@contextmanager
def server(
    database_url: str,
    scratch: Path,
    entries: list[dict[str, Any]] | None,
    extra_env: dict[str, str],
    tree: Path | None = None,
) -> Iterator[tuple[int, int]]:
    """The server with a routing file of these entries (None: no file, every model offline), running the app of
    ``tree`` (default: SERVED_TREE)."""
    tree = tree or SERVED_TREE
    port = base.free_port()
    config = []
    if entries is not None:
        path = scratch / f"routing-{port}.json"
        path.write_text(json.dumps({"model_list": entries}))
        config = ["--config", str(path)]
    data_dir = scratch / f"data-{port}"
    data_dir.mkdir()
    env = {**os.environ, "ASSISTANTS_API_KEYS": "", "LITELLM_LOCAL_MODEL_COST_MAP": "True", **extra_env}
    env.setdefault("ASSISTANTS_WORKER_CONCURRENCY", "80")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", str(port), *config,
        "--data-dir", str(data_dir), "--database-url", database_url, "--log-level", "warning",
    ]  # fmt: skip
    log = scratch / f"server-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, cwd=tree, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        asyncio.run(base.wait_ready(base.Server(process, port, log)))
        yield port, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# The load's order of what clients do (the latency rows follow --modes).
LOAD_ORDER = ("poll", "stream", "thread-poll", "thread-stream")

LABELS = {
    "direct": "direct → stub",
    "litellm": "litellm → stub",
    "azure": "azure/ route → stub",
    "offline": "offline model",
    "anthropic": "anthropic/ route → Anthropic stub",
}


async def bench_database(
    db: str, port: int, pid: int, stub_port: int, args: argparse.Namespace, database_pid: int | None = None
) -> list[str]:
    client = Client("127.0.0.1", port)
    _, data = await client.call("POST", "/v1/assistants", {"model": "offline-bench", "instructions": "Be brief."})
    await client.close()
    assistant_id = json.loads(data)["id"]

    def streamed(model: str) -> Any:
        return lambda c, i: stream_once(c, assistant_id, model, f"hello {i}")

    def polled(model: str) -> Any:
        return lambda c, i: poll_once(c, assistant_id, model, f"hello {i}")

    def streamed_on_thread(model: str) -> Any:
        return lambda c, i: stream_on_thread_once(c, assistant_id, model, f"hello {i}")

    def polled_on_thread(model: str) -> Any:
        return lambda c, i: poll_on_thread_once(c, assistant_id, model, f"hello {i}")

    kinds = {
        "stream": ("stream", "stream", streamed),
        "poll": ("create_and_poll", "poll (SDK)", polled),
        "thread-stream": ("stream on a thread", "stream on a thread", streamed_on_thread),
        "thread-poll": ("create_and_poll on a thread", "poll (SDK) on a thread", polled_on_thread),
    }

    floor = await sequential(stub_port, args.runs, lambda c, i: floor_once(c))
    base_ms = pct(floor, 0.5)
    rows = [
        f"| {db} | floor: streamed completion straight to the stub | {base_ms:.2f} | {pct(floor, 0.95):.2f} | 1.0 | - |"
    ]
    for kind, _mode, once in [kinds[name] for name in args.modes]:
        for path in args.paths:
            samples = await sequential(port, args.runs, once(MODELS[path]))
            p50 = pct(samples, 0.5)
            polls = f"{sum(s.polls for s in samples) / len(samples):.2f}" if samples[0].polls else "-"
            rows.append(
                f"| {db} | {kind}, {LABELS[path]} | {p50:.2f} | {pct(samples, 0.95):.2f} | {p50 / base_ms:.1f} "
                f"(+{p50 - base_ms:.1f} ms) | {polls} |"
            )
    load_rows = []
    for path in args.paths:
        for _kind, mode, make in [kinds[name] for name in LOAD_ORDER if name in args.modes]:
            for clients in args.clients:
                result = await load(
                    port, pid, clients, args.duration, args.load_warmup, make(MODELS[path]), database_pid
                )
                count = len(result.samples)
                cpu_ms = result.cpu * 1000 / count if count else float("nan")
                client_ms = result.client_cpu * 1000 / count if count else float("nan")
                database_ms = f"{result.database_cpu * 1000 / count:.1f}" if count and database_pid else "-"
                polls = f"{sum(s.polls for s in result.samples) / count:.2f}" if count and "poll" in mode else "-"
                split = " / ".join(f"{share:.0%}" for share in result.shares) or "-"
                load_rows.append(
                    f"| {db} | {LABELS[path]} | {mode} | {clients} | **{count / args.duration:.0f}** | "
                    f"{pct(result.samples, 0.5):.1f} | {pct(result.samples, 0.95):.1f} | {polls} | {cpu_ms:.1f} | "
                    f"{database_ms} | "
                    f"{result.peak_rss:.0f} | {len(result.errors)} | {client_ms:.1f} | {split} |"
                )
    return [*rows, "", *load_rows, "", f"{db}: RSS after the load {rss_mib(pid):.0f} MiB"]


async def call_path(stub_port: int, anthropic_port: int, scratch: Path, count: int) -> list[str]:
    """CPU per streamed completion of the provider call path alone, in this
    process: a bare socket (the floor of any client), a bare httpx stream,
    the direct path, litellm, an azure/ route, an anthropic/ route (directly
    and through litellm)."""
    import httpx

    from app.llm import LLM, ChatRequest

    path = scratch / "call-path.json"
    anthropic = anthropic_routes(anthropic_port)
    path.write_text(json.dumps({"model_list": [*routing(stub_port, ["direct", "litellm", "azure"]), *anthropic]}))
    llm = LLM.from_config(path)
    url = f"http://127.0.0.1:{stub_port}/v1/chat/completions"
    messages: list[dict[str, Any]] = [{"role": "user", "content": "hello"}]
    body = {"model": "bench", "stream": True, "messages": messages, "stream_options": {"include_usage": True}}
    payload = json.dumps(body).encode()

    async with httpx.AsyncClient() as client:

        async def bare() -> None:
            async with client.stream("POST", url, content=payload, headers={"Content-Type": "application/json"}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        json.loads(line[6:])

        raw = await asyncio.open_connection("127.0.0.1", stub_port)
        request = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{stub_port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload

        async def socket_floor() -> None:
            # The least any client does: the request written on a kept-alive
            # connection, the answer read to its last chunk, each chunk's JSON
            # parsed (no headers checked, no pool, no errors: not a client).
            reader, writer = raw
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            assert b"chunked" in head.lower()
            while True:
                size = int((await reader.readline()).strip(), 16)
                piece = await reader.readexactly(size + 2)
                if size == 0:
                    break
                for line in piece.split(b"\n"):
                    if line.startswith(b"data: {"):
                        json.loads(line[6:])

        async def through(model: str) -> None:
            async for _ in llm.stream(ChatRequest(model, messages)):
                pass

        rows = []
        for label, once in [
            ("bare socket, chunks read and parsed (the floor of any client)", socket_floor),
            ("bare httpx stream", bare),
            ("direct", lambda: through(MODELS["direct"])),
            ("litellm", lambda: through(MODELS["litellm"])),
            ("azure/ route", lambda: through(MODELS["azure"])),
            ("anthropic/ route (direct) → Anthropic stub", lambda: through("claude-bench")),
            ("anthropic/ route (litellm, direct: false) → Anthropic stub", lambda: through("claude-litellm")),
        ]:
            for _ in range(20):
                await once()
            started = time.process_time()
            for _ in range(count):
                await once()
            rows.append(f"| {label} | {(time.process_time() - started) * 1000 / count:.2f} |")
    raw[1].close()
    await llm.aclose()
    return rows


def anthropic_routes(port: int) -> list[dict[str, Any]]:
    """claude-bench to an Anthropic Messages stub directly, claude-litellm to it through litellm."""
    params = {"api_base": f"http://127.0.0.1:{port}", "api_key": "x"}
    return [
        {"model_name": "claude-bench", "litellm_params": {"model": "anthropic/claude-bench", **params}},
        {
            "model_name": "claude-litellm",
            "litellm_params": {"model": "anthropic/claude-bench", **params},
            "direct": False,
        },
    ]


def idle_rss(scratch: Path, stub_port: int, extra_env: dict[str, str]) -> list[str]:
    """A fresh server per routing file, its RSS once ready (SQLite): what each path costs at rest."""
    rows: list[str] = []
    for label, entries in [
        ("offline model only (no routing file)", None),
        ("direct routes (+ offline)", routing(stub_port, ["direct", "offline"])),
        ("a route through litellm (+ direct, offline)", routing(stub_port, ["direct", "litellm", "offline"])),
        ("an azure/ route (+ offline)", routing(stub_port, ["azure", "offline"])),
        ("anthropic/ routes only", anthropic_routes(stub_port)[:1]),
    ]:
        url = f"sqlite+aiosqlite:///{scratch / f'idle-{len(rows)}.db'}"
        with server(url, scratch, entries, extra_env) as (_port, pid):
            time.sleep(1.0)  # let start-up work settle
            rows.append(f"| {label} | {rss_mib(pid):.0f} |")
    return rows


def main() -> None:
    global SERVED_TREE, TOKENS, TOKEN_GAP_MS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--runs", type=int, default=200, help="sequential requests per latency figure")
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    parser.add_argument("--paths", type=lambda s: s.split(","), default=["direct", "litellm", "offline"])
    parser.add_argument(
        "--modes",
        type=lambda s: s.split(","),
        default=["stream", "poll", "thread-stream", "thread-poll"],
        help="what clients do: stream, poll (a new thread and run), thread-stream, thread-poll (a run on a thread "
        "made first, untimed: its latency is the run's alone, its runs/s counts the thread's create too)",
    )
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds per load point")
    parser.add_argument(
        "--tokens", type=int, default=TOKENS, help="words in each of the stubs' answers (a real answer has hundreds)"
    )
    parser.add_argument(
        "--token-gap-ms", type=float, default=TOKEN_GAP_MS, help="the stub's wait before each word (0: at once)"
    )
    parser.add_argument("--load-warmup", type=float, default=1.0)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server")
    parser.add_argument("--call-path", type=int, default=0, metavar="N", help="only: CPU of N completions in-process")
    parser.add_argument("--anthropic-stub", type=int, default=0, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--idle-only", action="store_true", help="only: idle RSS per routing file")
    parser.add_argument(
        "--tree", type=Path, default=REPO, help="the working tree whose app the server runs (default: this script's)"
    )
    args = parser.parse_args()
    SERVED_TREE = args.tree.resolve()
    TOKENS, TOKEN_GAP_MS = args.tokens, args.token_gap_ms
    print(f"the server runs the app of {SERVED_TREE}")
    if args.idle_only:
        with tempfile.TemporaryDirectory(prefix="bench-overhead-") as name:
            rows = idle_rss(Path(name), base.free_port(), dict(item.split("=", 1) for item in args.env))
        print(f"load average {os.getloadavg()[0]:.2f}\n\n| server started with | idle RSS MiB |\n|---|---:|")
        print("\n".join(rows))
        return
    if args.anthropic_stub:
        asyncio.run(anthropic_stub(args.anthropic_stub))
        return
    if args.call_path:
        anthropic_port = base.free_port()
        command = [sys.executable, __file__, "--anthropic-stub", str(anthropic_port)]
        with (
            tempfile.TemporaryDirectory(prefix="bench-overhead-") as name,
            stub(Path(name)) as stub_port,
            _child(command, anthropic_port),
        ):
            rows = asyncio.run(call_path(stub_port, anthropic_port, Path(name), args.call_path))
        print(f"load average {os.getloadavg()[0]:.2f}\n\n| path | CPU ms per completion |\n|---|---:|")
        print("\n".join(rows))
        return
    extra_env = dict(item.split("=", 1) for item in args.env)
    databases = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    load_before = os.getloadavg()
    latency, loads, notes = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as name:
        scratch = Path(name)
        anthropic_port = base.free_port() if "anthropic" in args.paths else 0
        anthropic = [sys.executable, __file__, "--anthropic-stub", str(anthropic_port)]
        with (
            stub(scratch) as stub_port,
            _child(anthropic, anthropic_port) if anthropic_port else contextlib.nullcontext(),
        ):
            entries = routing(stub_port, args.paths, anthropic_port)
            for db in databases:
                with (
                    _database(db, scratch) as (url, database_pid),
                    server(url, scratch, entries, extra_env) as (
                        port,
                        pid,
                    ),
                ):
                    lines = asyncio.run(bench_database(db, port, pid, stub_port, args, database_pid))
                    first_blank = lines.index("")
                    latency += lines[:first_blank]
                    loads += lines[first_blank + 1 : -2]
                    notes.append(lines[-1])
            idle = idle_rss(scratch, stub_port, extra_env)
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)\n")
    print("| db | what | p50 ms | p95 ms | p50 / floor | polls/run |\n|---|---|---:|---:|---:|---:|")
    print("\n".join(latency))
    print(
        "\n| db | path | clients do | clients | runs/s | p50 ms | p95 ms | polls/run | server CPU ms/run "
        "| PostgreSQL CPU ms/run | peak RSS MiB | errors | bench client CPU ms/run "
        "| serving processes' CPU shares |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    print("\n".join(loads))
    print("\n" + "\n".join(notes))
    print("\n| server started with | idle RSS MiB |\n|---|---:|")
    print("\n".join(idle))


@contextmanager
def _child(command: list[str], port: int) -> Iterator[None]:
    """A child process serving on port, once it accepts connections."""
    process = subprocess.Popen(command, cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            time.sleep(0.05)
        yield
    finally:
        process.terminate()
        process.wait(timeout=15)


@contextmanager
def _database(db: str, scratch: Path) -> Iterator[tuple[str, int | None]]:
    """The database's URL, and PostgreSQL's postmaster (its CPU is counted per run)."""
    if db == "sqlite":
        yield f"sqlite+aiosqlite:///{scratch / 'bench.db'}", None
        return
    (scratch / "pg").mkdir(exist_ok=True)
    with base.postgres_url(scratch / "pg") as (url, postmaster):
        yield url, postmaster


if __name__ == "__main__":
    main()
