"""Stream events: the ``event:`` name and the ``data:`` payload of one SSE frame
(wire notes section 3). The run executor publishes them; api/sse.py serves them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, overload

from pydantic import BaseModel

from app.wire import jsontext

DONE = "done"


class _EncodedOnce:
    """``Event.json``: encoded on the first read and kept in the event's
    dict, where later reads find it first, as functools.cached_property
    does, without the lock it takes on every first read (Python 3.11: twice
    the cost of encoding a text delta)."""

    def __set_name__(self, owner: type[Event], name: str) -> None:
        self.name = name  # the instance-dict key where a read finds it first

    @overload
    def __get__(self, event: None, owner: type[Event]) -> _EncodedOnce: ...
    @overload
    def __get__(self, event: Event, owner: type[Event]) -> str: ...
    def __get__(self, event: Event | None, owner: type[Event]) -> _EncodedOnce | str:
        if event is None:
            return self
        text = event.data if isinstance(event.data, str) else jsontext.dumps(event.data)
        event.__dict__[self.name] = text
        return text


@dataclass(frozen=True)
class Event:
    name: str  # e.g. "thread.run.created", "thread.message.delta", "done"
    data: dict[str, Any] | str  # a wire object as JSON-ready dict (never changed once made); "[DONE]" for done

    @classmethod
    def of(cls, name: str, model: BaseModel) -> Event:
        return cls(name, _dumped(model))

    @classmethod
    def each(cls, names: Iterable[str], model: BaseModel) -> list[Event]:
        """One event per name, all carrying ``model`` in one state (say
        ``thread.message.created`` and ``.in_progress``): dumped and encoded
        once for all of them (issue 17)."""
        data = _dumped(model)
        text = jsontext.dumps(data)
        events = [cls(name, data) for name in names]
        for event in events:
            event.__dict__[cls.json.name] = text  # what ``json`` would compute
        return events

    # ``data`` as one-line JSON (``[DONE]`` as it is), encoded once for both
    # the run's event log and its SSE frame (issue 17). Not annotated: no field.
    json = _EncodedOnce()


def _dumped(model: BaseModel) -> dict[str, Any]:
    """``model.model_dump(mode="json")``, from its serializer directly
    (issue 17: model_dump's own work was a quarter of a run's 9 µs)."""
    data: dict[str, Any] = model.__pydantic_serializer__.to_python(model, mode="json")
    return data


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
# A run ends here: no executor takes it again.
FINAL_RUN_EVENTS = TERMINAL_RUN_EVENTS - {"thread.run.requires_action"}
