"""Run metrics and the failed-run log line, derived from the run events.

Every change of a run is published on the EventBus after its transaction
commits (run_state.transition() returns the event; the caller publishes it),
and exactly once, by the process that made the change: so a tap on the bus
sees each run reach its final status once, with the run object (model,
timestamps, last_error) in the event. Times are measured here with a
monotonic clock from the ``in_progress`` event this process published; a run
that started in another process (a standalone worker took it over after
requires_action) falls back to the run's own ``started_at`` (whole seconds).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app.wire.events import Event

if TYPE_CHECKING:
    from app.observability.metrics import Metrics

log = logging.getLogger("app.runs")

FINAL_STATUSES = frozenset({"completed", "incomplete", "failed", "cancelled", "expired"})
# Runs whose final event this process may never see (another process ended
# them) must not pile up: the oldest clocks are dropped beyond this many.
MAX_TRACKED_RUNS = 10_000


@dataclass
class _Clock:
    model: str
    started: float  # time.monotonic() at in_progress
    first_token_seen: bool = False


class RunTracker:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._clocks: OrderedDict[str, _Clock] = OrderedDict()

    def observe(self, run_id: str, events: list[Event]) -> None:
        """The EventBus tap: called with every batch of published events."""
        for event in events:
            if event.name == "thread.message.delta":
                self._first_token(run_id)
            elif event.name.startswith("thread.run.") and isinstance(event.data, dict):
                status = event.name.removeprefix("thread.run.")
                if status == "in_progress":
                    self._start(run_id, event.data)
                elif status in FINAL_STATUSES:
                    self._finish(run_id, status, event.data)

    def _start(self, run_id: str, run: dict[str, Any]) -> None:
        if run_id in self._clocks:
            return  # resumed after requires_action: the run started earlier
        self._clocks[run_id] = _Clock(self.metrics.model_label(str(run.get("model", ""))), time.monotonic())
        while len(self._clocks) > MAX_TRACKED_RUNS:
            self._clocks.popitem(last=False)

    def _first_token(self, run_id: str) -> None:
        clock = self._clocks.get(run_id)
        if clock is None or clock.first_token_seen:
            return
        clock.first_token_seen = True
        self.metrics.series(self.metrics.run_ttft, clock.model).observe(time.monotonic() - clock.started)

    def _finish(self, run_id: str, status: str, run: dict[str, Any]) -> None:
        clock = self._clocks.pop(run_id, None)
        model = clock.model if clock is not None else self.metrics.model_label(str(run.get("model", "")))
        self.metrics.series(self.metrics.runs_total, status, model).inc()
        if clock is not None:
            self.metrics.series(self.metrics.run_duration, status, model).observe(time.monotonic() - clock.started)
        elif isinstance(run.get("started_at"), int):
            self.metrics.series(self.metrics.run_duration, status, model).observe(
                max(0.0, time.time() - run["started_at"])
            )
        if status in ("failed", "expired"):
            _log_unsuccessful(run_id, status, model, run.get("last_error"))


def _log_unsuccessful(run_id: str, status: str, model: str, last_error: Any) -> None:
    """Once per run: the final event is published once (see the module doc)."""
    if isinstance(last_error, dict):
        reason = f"{last_error.get('code')}: {last_error.get('message')}"
    else:
        reason = "expires_at passed" if status == "expired" else "no last_error"
    log.warning(
        "run %s %s (model %s): %s",
        run_id,
        status,
        model,
        reason,
        extra={"run_id": run_id, "status": status, "model": model, "last_error": last_error},
    )
