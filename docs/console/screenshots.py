"""Regenerate the console screenshots in this folder (for the README):

    .venv/bin/python docs/console/screenshots.py

Starts a live server with some data (an assistant with a function and
file_search, a finished run, a vector store) and photographs the main pages
in Debian's Chromium."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import openai
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.settings import Settings  # noqa: E402
from tests.console.test_browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from tests.streaming.conftest import LiveServer  # noqa: E402

HERE = Path(__file__).parent
KEY = "sk-screenshots"


def populate(sdk: openai.OpenAI) -> tuple[str, str, str]:
    store = sdk.vector_stores.create(name="Zoo handbook")
    sdk.vector_stores.file_batches.upload_and_poll(
        store.id,
        files=[
            ("zebras.md", b"# Zebras\n\nZebras sleep standing up in the savanna, in groups that keep watch.\n"),
            ("owls.md", b"# Owls\n\nOwls hunt at night and sleep during the day.\n"),
        ],
    )
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    assistant = sdk.beta.assistants.create(
        model="gpt-4o",
        name="Zookeeper",
        instructions="You answer questions about the zoo from the handbook. Check the weather before outdoor plans.",
        tools=[weather, {"type": "file_search"}],  # type: ignore[list-item]
        tool_resources={"file_search": {"vector_store_ids": [store.id]}},
    )
    script = '[[call get_weather {"city": "Nairobi"}]] [[then call file_search {"query": "how do zebras sleep"}]]'
    thread = sdk.beta.threads.create(messages=[{"role": "user", "content": script}], metadata={"visitor": "demo"})
    run = sdk.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id, poll_interval_ms=20)
    assert run.required_action is not None
    call = run.required_action.submit_tool_outputs.tool_calls[0]
    run = sdk.beta.threads.runs.submit_tool_outputs_and_poll(
        thread_id=thread.id, run_id=run.id, tool_outputs=[{"tool_call_id": call.id, "output": "28C, sunny"}]
    )
    return thread.id, run.id, store.id


def main() -> None:
    with tempfile.TemporaryDirectory() as data:
        settings = Settings(data_dir=Path(data), api_keys=[KEY], poll_after_ms=10)
        server = LiveServer(settings)
        server.start()
        try:
            with openai.OpenAI(base_url=server.base_url, api_key=KEY) as sdk:
                thread_id, run_id, store_id = populate(sdk)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(
                    base_url=f"http://127.0.0.1:{server.port}", viewport={"width": 1200, "height": 900}
                )
                page.goto("/console/login")
                page.fill("input[name=key]", KEY)
                page.click("button[type=submit]")
                for name, path in (
                    ("run", f"/console/threads/{thread_id}/runs/{run_id}"),
                    ("thread", f"/console/threads/{thread_id}"),
                    ("vector-store", f"/console/vector_stores/{store_id}?q=how+do+zebras+sleep"),
                ):
                    page.goto(path)
                    page.screenshot(path=HERE / f"{name}.png", full_page=True)
                browser.close()
        finally:
            server.stop()


if __name__ == "__main__":
    main()
