"""ScriptBook without a server: a run's later tool rounds come from the rule
that answered its first round, even when that rule's ``times`` are spent."""

from __future__ import annotations

from typing import Any

import pytest

from app.llm.interface import ChatRequest, LLMError
from app.llm.offline import OfflineModel
from app.scripting import RequestContext, ScriptBook

pytestmark = pytest.mark.timeout(10)


def test_later_rounds_follow_the_rule_that_answered_the_first() -> None:
    book = ScriptBook()
    book.add({"rounds": [{"tool_calls": [{"function": "lookup"}]}, "From the one-off rule."], "times": 1})
    book.add({"rounds": [{"tool_calls": [{"function": "lookup"}]}, "From the standing rule."]})
    first, second = RequestContext(run_id="run_1"), RequestContext(run_id="run_2")

    def answered(rounds: int, context: RequestContext) -> str:
        """Which rule answered: the reply its script ends with (the model picks the round's step)."""
        directives = book.answer("m", "hi", rounds, context)
        assert directives is not None
        return directives[-1][1]

    assert answered(0, first) == "From the one-off rule."
    assert answered(0, second) == "From the standing rule."  # the one-off rule is spent
    # Round 1 of each run continues with that run's own rule.
    assert answered(1, first) == "From the one-off rule."
    assert answered(1, second) == "From the standing rule."
    assert [book.used(rule.id) for rule in book.rules()] == [1, 1]


_LOOKUP = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize(
    ("rule", "raises"),
    [
        ({"respond": "At once."}, False),  # taken at once
        ({"respond": "Slowly.", "delay_ms": 1}, False),  # streamed: answer() gives None, stream() takes it
        ({"rounds": [{"tool_calls": [{"function": "missing"}]}]}, True),  # a cue it cannot follow (not offered)
    ],
)
async def test_the_offline_model_counts_a_rules_use_once_however_it_answers(rule: dict[str, Any], raises: bool) -> None:
    """Looking whether it can answer at once counts no use of a scripted rule
    with ``times``; the answer taken, streamed or failed counts one."""
    book = ScriptBook()
    added = book.add({**rule, "times": 1})
    model = OfflineModel([], book)
    request = ChatRequest(
        model="m", messages=[{"role": "user", "content": "hi"}], tools=_LOOKUP, context=RequestContext(run_id="r")
    )
    try:
        if model.answer(request, 1) is None:
            assert book.used(added.id) == 0
            assert [event async for event in model.stream(request, 1)]
    except LLMError:
        assert raises
    else:
        assert not raises
    assert book.used(added.id) == 1
