"""The code_interpreter tool's pure parts: decoding streamed arguments, the
answer's file_path annotations, and the offline model's ```python cue."""

from __future__ import annotations

import json

import pytest

from app import llm
from app.runner.tools.code_interpreter import CodeCallStream, _annotate, code_of

TRICKY = 'print("caf\u00e9 \\u00e9 \\\\ done")\n# 😀 and a quote: "\ttab'


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_streamed_arguments_decode_to_the_code_in_any_fragments(size: int) -> None:
    arguments = json.dumps({"code": TRICKY})  # ensure_ascii: \u escapes and a surrogate pair
    stream = CodeCallStream()
    assert stream.first() == {"type": "code_interpreter", "code_interpreter": {"input": "", "outputs": []}}
    pieces = [arguments[n : n + size] for n in range(0, len(arguments), size)]
    decoded = [body["code_interpreter"]["input"] for piece in pieces if (body := stream.feed(piece)) is not None]
    assert "".join(decoded) == TRICKY
    assert code_of(arguments) == TRICKY


def test_arguments_that_are_not_code_stream_nothing() -> None:
    stream = CodeCallStream()
    assert stream.feed('{"language": "python"}') is None
    assert code_of('{"language": "python"}') is None
    assert code_of("not json") is None


def test_links_to_files_made_by_the_run_become_file_path_annotations() -> None:
    value = "See sandbox:/mnt/data/out.csv.gz and [chart](sandbox:/mnt/data/out.csv), not sandbox:/mnt/data/other.txt"
    part = {"type": "text", "text": {"value": value, "annotations": []}}
    annotated = _annotate(part, {"out.csv": "file-a", "out.csv.gz": "file-b"})
    found = [
        (a["text"], a["file_path"]["file_id"], a["start_index"], a["end_index"])
        for a in annotated["text"]["annotations"]
    ]
    assert found == [
        ("sandbox:/mnt/data/out.csv.gz", "file-b", 4, 32),
        ("sandbox:/mnt/data/out.csv", "file-a", 45, 70),
    ]
    for text, _, start, end in found:
        assert value[start:end] == text


def _request(text: str, tools: list[str]) -> llm.ChatRequest:
    offered = [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}} for name in tools]
    return llm.ChatRequest(model="gpt-4o", messages=[{"role": "user", "content": text}], tools=offered)


async def _stream(request: llm.ChatRequest) -> tuple[str, list[tuple[str | None, str]]]:
    text, calls = "", []
    async for event in llm.LLM.from_config(None).stream(request):
        if isinstance(event, llm.TextDelta):
            text += event.text
        elif isinstance(event, llm.ToolCallDelta):
            if event.name is not None:
                calls.append((event.name, ""))
            calls[-1] = (calls[-1][0], calls[-1][1] + event.arguments)
    return text, calls


async def test_the_offline_model_runs_fenced_python_with_code_interpreter() -> None:
    code = 'import math\nprint(math.pi)  # "quoted"\n'
    message = f"Run this:\n```python\n{code}```\nthanks"
    text, calls = await _stream(_request(message, ["code_interpreter"]))
    assert text == "" and len(calls) == 1
    assert calls[0][0] == "code_interpreter" and json.loads(calls[0][1]) == {"code": code}


async def test_the_fenced_cue_needs_the_tool_and_yields_to_directives() -> None:
    message = "```python\nprint(1)\n```"
    assert await _stream(_request(message, [])) == (f"You said: {message}", [])
    text, calls = await _stream(_request(message + " [[reply no code]]", ["code_interpreter"]))
    assert (text, calls) == ("no code", [])
