"""The support bot's tests: its real code against the Assistants API, offline,
with the model's side scripted (no prompt was edited to test it)."""

from __future__ import annotations

import json

from support_bot import SupportBot


def test_it_looks_the_order_up_and_answers(assistants):
    bot = SupportBot()
    assistants.script(
        assistant_id=bot.assistant.id,
        message=r"A-\d+",
        rounds=[
            {"tool_calls": [{"function": "lookup_order", "arguments": {"order_id": "A-1001"}}]},
            "Your order A-1001 has shipped and arrives Tuesday.",
        ],
    )
    assert bot.ask("Where is my order A-1001?") == "Your order A-1001 has shipped and arrives Tuesday."

    # What the model saw: the bot's instructions, then the tool's real output.
    first, second = assistants.model_requests(run_id=None)[-2:]
    assert "Use lookup_order" in first["request"]["messages"][0]["content"]
    tool_message = second["request"]["messages"][-1]
    assert tool_message["role"] == "tool"
    assert json.loads(tool_message["content"]) == {"status": "shipped", "eta": "Tuesday"}


def test_it_apologises_when_the_model_fails(assistants):
    bot = SupportBot()
    assistants.script({"fail": "rate_limit"}, thread_metadata={"customer": "vip"})
    assert bot.ask("Hello?", customer="vip") == "Sorry, something went wrong (rate_limit_exceeded)."


def test_each_test_starts_from_an_empty_server(assistants):
    client = assistants.openai_client()
    assert [a.name for a in client.beta.assistants.list().data] == []
