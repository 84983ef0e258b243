"""A small application that uses the Assistants API: a support bot that looks
up orders through a function tool. Nothing in it knows about tests; it reads
OPENAI_BASE_URL / OPENAI_API_KEY from the environment like any OpenAI app."""

from __future__ import annotations

import json
from typing import Any

from openai import OpenAI

ORDERS = {"A-1001": {"status": "shipped", "eta": "Tuesday"}, "A-1002": {"status": "processing", "eta": None}}

LOOKUP_ORDER = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "description": "Find an order by its number.",
        "parameters": {
            "type": "object",
            "properties": {"order_id": {"type": "string"}},
            "required": ["order_id"],
        },
    },
}


def lookup_order(order_id: str) -> dict[str, Any]:
    return ORDERS.get(order_id, {"error": f"no order {order_id}"})


class SupportBot:
    def __init__(self, client: OpenAI | None = None, model: str = "gpt-4o") -> None:
        self.client = client or OpenAI()
        self.assistant = self.client.beta.assistants.create(
            model=model,
            name="Support bot",
            instructions="You help customers with their orders. Use lookup_order for any order number.",
            tools=[LOOKUP_ORDER],
        )

    def ask(self, question: str, customer: str = "anonymous") -> str:
        thread = self.client.beta.threads.create(metadata={"customer": customer})
        self.client.beta.threads.messages.create(thread.id, role="user", content=question)
        run = self.client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=self.assistant.id)
        while run.status == "requires_action":
            outputs = []
            for call in run.required_action.submit_tool_outputs.tool_calls:
                arguments = json.loads(call.function.arguments or "{}")
                outputs.append({"tool_call_id": call.id, "output": json.dumps(lookup_order(**arguments))})
            run = self.client.beta.threads.runs.submit_tool_outputs_and_poll(
                thread_id=thread.id, run_id=run.id, tool_outputs=outputs
            )
        if run.status != "completed":
            return f"Sorry, something went wrong ({run.last_error.code if run.last_error else run.status})."
        latest = self.client.beta.threads.messages.list(thread.id, order="desc", limit=1).data[0]
        return latest.content[0].text.value
