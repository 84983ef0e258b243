"""Streamed chat completions over a real socket (issue 12): chunks arrive as
the model makes them, OpenAPI-valid, ``data:`` frames only, ended by
``data: [DONE]``; a client that leaves early ends only its stream."""

from __future__ import annotations

import json

import httpx2
import openai
import pytest

from tests import oas

pytestmark = pytest.mark.timeout(60)


def test_chunks_arrive_as_they_are_made(sdk: openai.OpenAI) -> None:
    # The model never finishes after three words: seeing them proves they are relayed, not buffered.
    text = ""
    with sdk.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "[[tokens 3]] [[hang]]"}], stream=True
    ) as stream:
        for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            if text == "lorem ipsum dolor":
                break
    assert text == "lorem ipsum dolor"


def test_usage_comes_last(sdk: openai.OpenAI) -> None:
    chunks = list(
        sdk.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "[[tokens 6]]"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "lorem ipsum dolor sit amet consectetur"
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_raw_frames_and_an_early_disconnect(raw: httpx2.Client, sdk: openai.OpenAI) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "one two three"}], "stream": True}
    with raw.stream("POST", "/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = b"".join(response.iter_raw()).decode().split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    for frame in frames[:-2]:
        assert frame.startswith("data: ") and "\nevent:" not in frame
        oas.validate(json.loads(frame[len("data: ") :]), "CreateChatCompletionStreamResponse")
    # Leave after the first chunk of a slow answer; the server goes on serving.
    slow = {**body, "messages": [{"role": "user", "content": "[[tokens 50]] [[delay 20]]"}]}
    with raw.stream("POST", "/chat/completions", json=slow) as response:
        next(response.iter_raw())
    again = sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "still here"}])
    assert again.choices[0].message.content == "You said: still here"
