"""Stream events: the ``event:`` name and the ``data:`` payload of one SSE frame
(wire notes section 3). The run executor publishes them; api/sse.py serves them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

DONE = "done"


@dataclass(frozen=True)
class Event:
    name: str  # e.g. "thread.run.created", "thread.message.delta", "done"
    data: dict[str, Any] | str  # a wire object as JSON-ready dict; "[DONE]" for done

    @classmethod
    def of(cls, name: str, model: BaseModel) -> Event:
        return cls(name, model.model_dump(mode="json"))


# A run stops here for its stream: a final state, or requires_action.
TERMINAL_RUN_EVENTS = frozenset(
    {
        "thread.run.requires_action",
        "thread.run.completed",
        "thread.run.incomplete",
        "thread.run.failed",
        "thread.run.cancelled",
        "thread.run.expired",
    }
)
