"""ScriptBook without a server: a run's later tool rounds come from the rule
that answered its first round, even when that rule's ``times`` are spent."""

from __future__ import annotations

import pytest

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
