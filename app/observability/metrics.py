"""Prometheus metrics, one registry per Runtime (no process-global state:
tests build many apps, and each must count only its own).

Counters and histograms are fed by three hooks: run events as they are
published (runs.py, a tap on the EventBus), every model call (``LLM.observer``)
and every HTTP request (http.py). Gauges of what is in the database (the
queue, vector store files) and of sandbox sessions are computed when
Prometheus scrapes, by ``refresh()``: a couple of indexed queries.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import func, select

import app as package
from app import orm
from app.observability.runs import RunTracker

if TYPE_CHECKING:
    from app.llm import Usage
    from app.runtime import Runtime

log = logging.getLogger("app.metrics")

MetricT = TypeVar("MetricT", Counter, Histogram)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A scrape must answer even when the database does not: its queries give up after this.
REFRESH_TIMEOUT_SECONDS = 2.0
# Run and model-call labels carry the model name a client chose; beyond this
# many distinct names, new ones are counted as "other" so that a client
# cannot blow up the number of series.
MAX_MODEL_LABELS = 100
OTHER_MODEL = "other"

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_HTTP_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self._models: set[str] = set()
        self._series: dict[tuple[object, ...], Counter | Histogram] = {}
        Gauge("assistants_build_info", "The server's version (value 1)", ["version"], registry=registry).labels(
            package.__version__
        ).set(1)
        self.runs_total = Counter(
            "assistants_runs", "Runs that reached a final status", ["status", "model"], registry=registry
        )
        self.run_duration = Histogram(
            "assistants_run_duration_seconds",
            "From a run's start (in_progress) to its final status",
            ["status", "model"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.run_ttft = Histogram(
            "assistants_run_time_to_first_token_seconds",
            "From a run's start (in_progress) to its first message text delta",
            ["model"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.runs_queued = Gauge("assistants_runs_queued", "Runs waiting for a worker", registry=registry)
        self.oldest_queued_age = Gauge(
            "assistants_runs_queued_oldest_age_seconds", "Age of the oldest queued run (0: none)", registry=registry
        )
        self.model_calls = Counter(
            "assistants_model_calls", "Chat completions by model and outcome", ["model", "outcome"], registry=registry
        )
        self.model_call_duration = Histogram(
            "assistants_model_call_duration_seconds",
            "Chat completion latency, request to last chunk",
            ["model", "outcome"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.model_tokens = Counter(
            "assistants_model_tokens", "Tokens of chat completions", ["model", "kind"], registry=registry
        )
        self.vector_store_files = Gauge(
            "assistants_vector_store_files", "Vector store files by ingestion status", ["status"], registry=registry
        )
        self.sandbox_sessions = Gauge(
            "assistants_sandbox_sessions", "Live code_interpreter sessions in this process", registry=registry
        )
        self.runs_executing = Gauge(
            "assistants_runs_executing", "Runs the worker of this process is executing", registry=registry
        )
        self.worker_loop_age = Gauge(
            "assistants_worker_seconds_since_last_loop",
            "Since the worker of this process last completed a loop round (NaN: no worker here)",
            registry=registry,
        )
        self.http_requests = Counter(
            "assistants_http_requests",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.http_duration = Histogram(
            "assistants_http_request_duration_seconds",
            "HTTP request latency (for streams: until the stream ends)",
            ["method", "route"],
            buckets=_HTTP_SECONDS,
            registry=registry,
        )
        self.runs = RunTracker(self)

    def model_label(self, model: str) -> str:
        if model in self._models:
            return model
        if len(self._models) >= MAX_MODEL_LABELS:
            return OTHER_MODEL
        self._models.add(model)
        return model

    def observe_model_call(self, model: str, outcome: str, seconds: float, usage: Usage | None) -> None:
        label = self.model_label(model)
        self.series(self.model_calls, label, outcome).inc()
        self.series(self.model_call_duration, label, outcome).observe(seconds)
        if usage is not None:
            self.series(self.model_tokens, label, "prompt").inc(usage.prompt_tokens)
            self.series(self.model_tokens, label, "completion").inc(usage.completion_tokens)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.series(self.http_requests, method, route, str(status)).inc()
        self.series(self.http_duration, method, route).observe(seconds)

    def series(self, metric: MetricT, *labels: str) -> MetricT:
        """``metric.labels(*labels)``, kept: prometheus_client's takes a lock and
        builds its key on every call (about 5 µs; a run observes several).
        Bounded as the series are: labels are route templates, statuses and
        model labels (capped at MAX_MODEL_LABELS). A series still appears the
        first time it is observed."""
        key = (id(metric), *labels)
        child = self._series.get(key)
        if child is None:
            child = self._series[key] = metric.labels(*labels)
        return cast(MetricT, child)

    async def render(self, runtime: Runtime) -> bytes:
        """The exposition text, with the scrape-time gauges brought up to date."""
        await self.refresh(runtime)
        return generate_latest(self.registry)

    async def refresh(self, runtime: Runtime) -> None:
        self.sandbox_sessions.set(_sandbox_sessions(runtime))
        worker = runtime.worker
        self.runs_executing.set(worker.executing if worker is not None else 0)
        self.worker_loop_age.set(time.monotonic() - worker.last_loop_at if worker is not None else math.nan)
        try:
            async with asyncio.timeout(REFRESH_TIMEOUT_SECONDS):
                await self._refresh_from_database(runtime)
        except Exception as exc:
            # Keep the last values: the database's state shows in /readyz.
            log.warning("metrics: the database did not answer (%s: %s)", type(exc).__name__, exc)

    async def _refresh_from_database(self, runtime: Runtime) -> None:
        queued = select(func.count(), func.min(orm.Run.created_at)).where(orm.Run.status == "queued")
        files = select(orm.VectorStoreFile.status, func.count()).group_by(orm.VectorStoreFile.status)
        async with runtime.sessionmaker() as session:
            count, oldest = (await session.execute(queued)).one()
            by_status: dict[str, int] = {status: count for status, count in (await session.execute(files)).all()}
        self.runs_queued.set(count)
        self.oldest_queued_age.set(max(0.0, time.time() - oldest) if oldest is not None else 0.0)
        for status in ("in_progress", "completed", "failed", "cancelled", *by_status):
            self.vector_store_files.labels(status).set(by_status.get(status, 0))


def _sandbox_sessions(runtime: Runtime) -> int:
    """Sessions of the worker in this process (sandboxes live in the worker)."""
    if runtime.worker is None:
        return 0
    from app.runner.tools.code_interpreter import CodeInterpreter

    tool = runtime.worker.builtins.get("code_interpreter")
    return len(tool.sandboxes.sessions) if isinstance(tool, CodeInterpreter) else 0
