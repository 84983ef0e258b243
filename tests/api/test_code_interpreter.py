"""code_interpreter through the official SDK, with the offline model running
the ```python block of the user's message in the real (bubblewrap) sandbox."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from openai.types.beta.threads.runs import CodeInterpreterToolCallDelta

from app import sandbox


@pytest.fixture(autouse=True)
async def _end_sessions() -> AsyncIterator[None]:
    yield
    await sandbox.close_all()


def _code(source: str) -> str:
    return f"Please run this.\n```python\n{source}\n```"


async def _assistant(client: openai.AsyncOpenAI, **kwargs: Any) -> str:
    assistant = await client.beta.assistants.create(model="gpt-4o", tools=[{"type": "code_interpreter"}], **kwargs)
    return assistant.id


async def _ask(client: openai.AsyncOpenAI, thread_id: str, assistant_id: str, text: str, **message: Any) -> Any:
    await client.beta.threads.messages.create(thread_id, role="user", content=text, **message)
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread_id, assistant_id=assistant_id)
    assert run.status == "completed", run.last_error
    return run


async def _tool_call(client: openai.AsyncOpenAI, thread_id: str, run_id: str) -> Any:
    steps = await client.beta.threads.runs.steps.list(run_id, thread_id=thread_id, order="asc")
    calls = [call for step in steps.data if step.type == "tool_calls" for call in step.step_details.tool_calls]  # type: ignore[union-attr]
    assert len(calls) == 1 and calls[0].type == "code_interpreter"
    return calls[0]


async def _answer(client: openai.AsyncOpenAI, thread_id: str, run_id: str) -> Any:
    messages = await client.beta.threads.messages.list(thread_id, run_id=run_id)
    assert len(messages.data) == 1
    return messages.data[0]


CHART = """
import pandas as pd
import matplotlib.pyplot as plt
df = pd.read_csv("/mnt/data/sales.csv")
df.plot(x="month", y="total")
plt.show()
df.describe().to_csv("/mnt/data/summary.csv")
print(df["total"].sum())
"""


async def test_csv_chart_and_output_file(client: openai.AsyncOpenAI) -> None:
    upload = await client.files.create(file=("sales.csv", b"month,total\n1,10\n2,20\n3,15\n"), purpose="assistants")
    assistant_id = await _assistant(client)
    thread = await client.beta.threads.create()
    attachments = [{"file_id": upload.id, "tools": [{"type": "code_interpreter"}]}]
    run = await _ask(client, thread.id, assistant_id, _code(CHART), attachments=attachments)

    call = await _tool_call(client, thread.id, run.id)
    assert call.code_interpreter.input == CHART + "\n"  # the fenced block, verbatim
    logs = [output.logs for output in call.code_interpreter.outputs if output.type == "logs"]
    images = [output.image.file_id for output in call.code_interpreter.outputs if output.type == "image"]
    assert logs == ["45\n"] and len(images) == 1

    answer = await _answer(client, thread.id, run.id)
    kinds = [part.type for part in answer.content]
    assert kinds == ["image_file", "text"]
    assert answer.content[0].image_file.file_id == images[0]
    png = await client.files.content(images[0])
    assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
    image_file = await client.files.retrieve(images[0])
    assert image_file.purpose == "assistants_output"

    text = answer.content[1].text
    [annotation] = text.annotations
    assert annotation.type == "file_path" and annotation.text == "sandbox:/mnt/data/summary.csv"
    assert text.value[annotation.start_index : annotation.end_index] == annotation.text
    made = await client.files.retrieve(annotation.file_path.file_id)
    assert made.purpose == "assistants_output" and made.filename == "summary.csv"
    summary = await client.files.content(made.id)
    assert summary.content.startswith(b",month,total\ncount,3.0,3.0\n")


async def test_state_is_kept_between_calls(client: openai.AsyncOpenAI) -> None:
    assistant_id = await _assistant(client)
    thread = await client.beta.threads.create()
    await _ask(client, thread.id, assistant_id, _code("import math\nanswer = math.sqrt(1764)"))
    run = await _ask(client, thread.id, assistant_id, _code("print(int(answer))"))
    call = await _tool_call(client, thread.id, run.id)
    assert [output.logs for output in call.code_interpreter.outputs] == ["42\n"]
    answer = await _answer(client, thread.id, run.id)
    assert answer.content[0].text.value == "Tool results: code_interpreter -> 42"


async def test_sessions_are_per_thread(client: openai.AsyncOpenAI) -> None:
    assistant_id = await _assistant(client)
    first, second = await client.beta.threads.create(), await client.beta.threads.create()
    await _ask(client, first.id, assistant_id, _code("secret = 'first thread'\nopen('mine.txt', 'w').write('x')"))
    run = await _ask(
        client, second.id, assistant_id, _code("import os\nprint('secret' in globals(), os.listdir('/mnt/data'))")
    )
    call = await _tool_call(client, second.id, run.id)
    assert call.code_interpreter.outputs[0].logs == "False []\n"


async def test_a_failing_snippet_then_a_fixed_one(client: openai.AsyncOpenAI) -> None:
    assistant_id = await _assistant(client)
    thread = await client.beta.threads.create()
    run = await _ask(client, thread.id, assistant_id, _code("values = [1, 2, 3]\nprint(values[3])"))
    call = await _tool_call(client, thread.id, run.id)
    logs = call.code_interpreter.outputs[0].logs
    assert logs.startswith("Traceback (most recent call last):") and "IndexError: list index out of range" in logs
    assert "kernel" not in logs  # only the cell's own frames
    answer = await _answer(client, thread.id, run.id)
    assert "IndexError" in answer.content[0].text.value
    run = await _ask(client, thread.id, assistant_id, _code("print(values[2])"))
    call = await _tool_call(client, thread.id, run.id)
    assert call.code_interpreter.outputs[0].logs == "3\n"


async def test_thread_and_assistant_files_are_in_mnt_data(client: openai.AsyncOpenAI) -> None:
    mine = await client.files.create(file=("notes.txt", b"from the assistant"), purpose="assistants")
    theirs = await client.files.create(file=("data.txt", b"from the thread"), purpose="assistants")
    assistant_id = await _assistant(client, tool_resources={"code_interpreter": {"file_ids": [mine.id]}})
    thread = await client.beta.threads.create(tool_resources={"code_interpreter": {"file_ids": [theirs.id]}})
    source = "for name in ('notes.txt', 'data.txt'):\n    print(open('/mnt/data/' + name).read())"
    run = await _ask(client, thread.id, assistant_id, _code(source))
    call = await _tool_call(client, thread.id, run.id)
    assert call.code_interpreter.outputs[0].logs == "from the assistant\nfrom the thread\n"


async def test_step_streams_input_fragments_then_outputs(client: openai.AsyncOpenAI) -> None:
    assistant_id = await _assistant(client)
    thread = await client.beta.threads.create()
    source = 'text = "caf\\u00e9 \\"quoted\\""\nprint(text)'
    await client.beta.threads.messages.create(thread.id, role="user", content=_code(source))
    inputs: list[str] = []
    outputs: list[Any] = []
    async with client.beta.threads.runs.stream(thread_id=thread.id, assistant_id=assistant_id) as stream:
        async for event in stream:
            if event.event != "thread.run.step.delta":
                continue
            for call in event.data.delta.step_details.tool_calls or []:  # type: ignore[union-attr]
                assert isinstance(call, CodeInterpreterToolCallDelta) and call.code_interpreter is not None
                inputs += [call.code_interpreter.input] if call.code_interpreter.input else []
                outputs += call.code_interpreter.outputs or []
    assert len(inputs) > 1 and "".join(inputs) == source + "\n"
    assert [(output.type, output.logs) for output in outputs] == [("logs", 'café "quoted"\n')]
