"""Streams that any replica serves (issue 11), with real processes on
PostgreSQL: two API replicas with no worker of their own
(ASSISTANTS_EMBEDDED_WORKER=false) and two standalone ``worker`` processes.
A stream opened on one replica follows a run that a worker in another
process executes, through submit_tool_outputs and cancels requested on the
other replica, through a worker killed mid-stream, and a client comes back
with Last-Event-ID. The official Python and Node SDK stream helpers read
every stream.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
from openai.lib.streaming import AssistantEventHandler

from tests import pg
from tests.streaming.rules import SSE, StreamRules, frames, names
from tests.streaming.test_node_sdk import _run_script, node_project  # noqa: F401 (a fixture)
from tests.test_cli import REPO_ROOT, STOP_TIMEOUT, Server, clean_env, free_port

pytestmark = pytest.mark.timeout(120)

DEADLINE = 30.0
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
# The run's lease: a killed worker's run is resumed about this long after.
LEASE_SECONDS = "1"


@dataclass
class Cluster:
    database_url: str
    data_dir: Path
    logs: Path
    replicas: list[Server] = field(default_factory=list)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_worker(self) -> subprocess.Popen[bytes]:
        env = clean_env(
            ASSISTANTS_WORKER_POLL_SECONDS="0.2",
            ASSISTANTS_RUN_LEASE_SECONDS=LEASE_SECONDS,
            ASSISTANTS_WORKER_DRAIN_SECONDS="0.2",
        )
        command = [sys.executable, "-m", "app", "worker", "--database-url", self.database_url]
        command += ["--data-dir", str(self.data_dir)]
        with (self.logs / f"worker-{secrets.token_hex(3)}.log").open("wb") as log:
            process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.workers.append(process)
        return process

    def start_replica(self) -> Server:
        port = free_port()
        env = clean_env(ASSISTANTS_EMBEDDED_WORKER="false", ASSISTANTS_STREAM_KEEPALIVE_SECONDS="0.5")
        command = [sys.executable, "-m", "app", "serve", "--port", str(port), "--database-url", self.database_url]
        command += ["--data-dir", str(self.data_dir), "--log-level", "warning"]
        log_path = self.logs / f"replica-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        server = Server(process=process, port=port, log_path=log_path)
        self.replicas.append(server)
        return server

    def stop(self) -> None:
        for process in [*self.workers, *(replica.process for replica in self.replicas)]:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*self.workers, *(replica.process for replica in self.replicas)]:
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def cluster(postgres: pg.EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    name = "t_" + secrets.token_hex(6)
    postgres.create_database(name)
    root = tmp_path_factory.mktemp("replicas")
    cluster = Cluster(postgres.url(name), root / "data", root)
    try:
        first = cluster.start_replica()
        first.wait_ready()  # it migrates the database; the others find it done
        second = cluster.start_replica()
        cluster.start_worker()
        cluster.start_worker()
        second.wait_ready()
        yield cluster
    finally:
        cluster.stop()
        postgres.drop_database(name)


@pytest.fixture(scope="module")
def replica_a(cluster: Cluster) -> Server:
    return cluster.replicas[0]


@pytest.fixture(scope="module")
def replica_b(cluster: Cluster) -> Server:
    return cluster.replicas[1]


@pytest.fixture(scope="module")
def assistant_id(replica_a: Server) -> str:
    return replica_a.sdk().beta.assistants.create(model="gpt-4o", tools=[WEATHER_TOOL]).id


def _raw(server: Server) -> httpx2.Client:
    return httpx2.Client(base_url=server.base_url, timeout=DEADLINE, headers={"OpenAI-Beta": "assistants=v2"})


def _read(response: httpx2.Response) -> list[SSE]:
    rules = StreamRules()
    for item in frames(response.iter_raw()):
        if isinstance(item, SSE):
            rules.feed(item)
    rules.finish()
    return rules.events


def _text(events: list[SSE]) -> str:
    return "".join(
        part["text"]["value"]
        for event in events
        if event.event == "thread.message.delta"
        for part in event.data["delta"]["content"]
    )


def test_a_replica_streams_a_run_a_worker_elsewhere_executes(replica_a: Server, assistant_id: str) -> None:
    sdk = replica_a.sdk()
    thread = sdk.beta.threads.create(messages=[{"role": "user", "content": "Hello across processes"}])
    with sdk.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant_id) as stream:
        text = "".join(stream.text_deltas)
        run = stream.get_final_run()
    assert run.status == "completed" and text == "You said: Hello across processes"
    with _raw(replica_a) as raw, raw.stream("GET", f"/threads/{thread.id}/runs/{run.id}/events") as response:
        events = _read(response)
    assert [event.id for event in events[:-1]] == list(range(1, len(events)))
    assert names(events)[:3] == ["thread.run.created", "thread.run.queued", "thread.run.in_progress"]
    assert names(events)[-2:] == ["thread.run.completed", "done"] and _text(events) == text


def test_tool_outputs_and_the_continuation_stream_on_the_other_replica(
    replica_a: Server, replica_b: Server, assistant_id: str
) -> None:
    class Handler(AssistantEventHandler):
        def __init__(self) -> None:
            super().__init__()
            self.done_calls: list[str] = []

        def on_tool_call_done(self, tool_call: Any) -> None:
            self.done_calls.append(tool_call.function.name)

    prompt = 'Weather? [[call get_weather {"city": "Tokyo"}]]'
    thread = replica_a.sdk().beta.threads.create(messages=[{"role": "user", "content": prompt}])
    handler = Handler()
    with replica_a.sdk().beta.threads.runs.stream(
        thread_id=thread.id, assistant_id=assistant_id, event_handler=handler
    ) as stream:
        stream.until_done()
    paused = handler.current_run
    assert paused is not None and paused.status == "requires_action" and handler.done_calls == ["get_weather"]
    assert paused.required_action is not None
    (call,) = paused.required_action.submit_tool_outputs.tool_calls
    with replica_b.sdk().beta.threads.runs.submit_tool_outputs_stream(
        run_id=paused.id, thread_id=thread.id, tool_outputs=[{"tool_call_id": call.id, "output": '{"temp": 22}'}]
    ) as continuation:
        text = "".join(continuation.text_deltas)
        final = continuation.get_final_run()
    assert final.status == "completed" and text == 'Tool results: get_weather -> {"temp": 22}'
    # The whole run from the log, in two segments: up to requires_action, then on from there.
    with _raw(replica_b) as raw:
        with raw.stream("GET", f"/threads/{thread.id}/runs/{paused.id}/events") as response:
            first = _read(response)
        assert first[-2].event == "thread.run.requires_action"
        with raw.stream("GET", f"/threads/{thread.id}/runs/{paused.id}/events?after={first[-2].id}") as response:
            second = _read(response)
    assert names(second)[:2] == ["thread.run.step.completed", "thread.run.queued"]
    assert second[0].id == first[-2].id + 1 and names(second)[-2:] == ["thread.run.completed", "done"]


def test_a_cancel_on_one_replica_ends_the_stream_on_the_other(
    replica_a: Server, replica_b: Server, assistant_id: str
) -> None:
    sdk = replica_a.sdk()
    thread = sdk.beta.threads.create(messages=[{"role": "user", "content": "[[delay 50]] [[tokens 200]]"}])
    with (
        _raw(replica_a) as raw,
        raw.stream(
            "POST", f"/threads/{thread.id}/runs", json={"assistant_id": assistant_id, "stream": True}
        ) as response,
    ):
        rules, run_id, deltas = StreamRules(), "", 0
        for item in frames(response.iter_raw()):
            if not isinstance(item, SSE):
                continue
            rules.feed(item)
            run_id = run_id or item.data["id"]
            deltas += item.event == "thread.message.delta"
            if item.event == "thread.message.delta" and deltas == 5:
                replica_b.sdk().beta.threads.runs.cancel(run_id, thread_id=thread.id)
        rules.finish()
    # Deltas the worker streamed before it saw the cancel may come between.
    seen = names(rules.events)
    assert "thread.run.cancelling" in seen and seen[-2:] == ["thread.run.cancelled", "done"]
    assert sorted(seen[-4:-2]) == ["thread.message.incomplete", "thread.run.step.cancelled"]
    assert rules.events[-2].data["status"] == "cancelled"


def _executing_worker(cluster: Cluster, run_id: str) -> subprocess.Popen[bytes]:
    """The worker process whose lease the run holds (the lease names its pid)."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        owner = _lease_owner(cluster, run_id)
        if owner:
            pid = int(owner.split(":")[1])
            return next(worker for worker in cluster.workers if worker.pid == pid)
        time.sleep(0.02)
    pytest.fail(f"no worker took run {run_id}")


def _lease_owner(cluster: Cluster, run_id: str) -> str | None:
    return pg.lease_owner(cluster.database_url, run_id)


def test_a_worker_killed_mid_stream_the_stream_goes_on_and_a_client_comes_back(
    cluster: Cluster, replica_a: Server, replica_b: Server, assistant_id: str
) -> None:
    sdk = replica_a.sdk()
    # Three seconds of answer: the stream a client reads may run behind the
    # run on a loaded machine, and the run must still be executing when its
    # tenth delta reaches the test (at 1.2 s the run had ended by then once:
    # no lease left to find its worker by).
    thread = sdk.beta.threads.create(messages=[{"role": "user", "content": "[[delay 50]] [[tokens 60]]"}])
    rules, run_id, killed = StreamRules(), "", False
    with (
        _raw(replica_a) as raw,
        raw.stream(
            "POST", f"/threads/{thread.id}/runs", json={"assistant_id": assistant_id, "stream": True}
        ) as response,
    ):
        for item in frames(response.iter_raw()):
            if not isinstance(item, SSE):
                continue
            rules.feed(item)  # ids contiguous, every object closed before the next opens
            run_id = run_id or item.data["id"]
            deltas = sum(event.event == "thread.message.delta" for event in rules.events)
            if not killed and deltas == 10:
                doomed = _executing_worker(cluster, run_id)
                doomed.kill()  # SIGKILL: its unflushed deltas are lost with it
                doomed.wait(timeout=STOP_TIMEOUT)
                killed = True
                cluster.workers.remove(doomed)
                cluster.start_worker()  # two again, for the tests that follow
        rules.finish()
    events = rules.events
    assert killed and names(events)[-2:] == ["thread.run.completed", "done"]
    # The abandoned message and step were closed before the retried ones opened.
    closing = names(events).index("thread.message.incomplete")
    assert names(events)[closing : closing + 3] == [
        "thread.message.incomplete",
        "thread.run.step.failed",
        "thread.run.step.created",
    ]
    abandoned = events[[e.event for e in events].index("thread.message.incomplete")].data
    assert abandoned["incomplete_details"] == {"reason": "run_failed"}
    final_text = [e.data for e in events if e.event == "thread.message.completed"][-1]["content"][0]["text"]["value"]
    assert len(final_text.split()) == 60
    listed = sdk.beta.threads.messages.list(thread.id).data
    assert [m.status for m in listed if m.role == "assistant"] == ["completed"]

    # Back with Last-Event-ID on the other replica: exactly the rest of the stream.
    middle = events[len(events) // 2]
    with (
        _raw(replica_b) as raw,
        raw.stream(
            "GET", f"/threads/{thread.id}/runs/{run_id}/events", headers={"Last-Event-ID": str(middle.id)}
        ) as response,
    ):
        rest = [item for item in frames(response.iter_raw()) if isinstance(item, SSE)]
    assert [(e.id, e.event, e.data) for e in rest] == [(e.id, e.event, e.data) for e in events[len(events) // 2 + 1 :]]


def test_the_node_sdk_streams_across_processes(node_project: Path, replica_b: Server) -> None:  # noqa: F811
    result = _run_script(node_project, replica_b, "openai7")  # type: ignore[arg-type]
    assert result["text"]["run"]["status"] == "completed"
    assert result["weather"]["paused"]["status"] == "requires_action"
    assert result["weather"]["run"]["status"] == "completed"
