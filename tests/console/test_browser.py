"""The console in a real browser: Debian's Chromium driven by Playwright
(its own browser download is not used), against a live server on loopback."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from app.settings import Settings
from tests.streaming.conftest import LiveServer

pytestmark = pytest.mark.timeout(120)
KEY = "sk-console-browser"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Quiet, offline Chromium: no first-run UI, no background network (refused here anyway).
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 20_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data = tmp_path_factory.mktemp("console")
    settings = Settings(
        data_dir=data, database_url=f"sqlite+aiosqlite:///{data / 'db.sqlite'}", api_keys=[KEY], poll_after_ms=10
    )
    live = LiveServer(settings)
    live.start()
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Chromium is missing: scripts/bootstrap installs Debian's chromium as root"
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def page(browser: Any, server: LiveServer) -> Iterator[Any]:
    context = browser.new_context(base_url=f"http://127.0.0.1:{server.port}")
    context.set_default_timeout(WAIT_MS)
    tab = context.new_page()
    tab.goto("/console/assistants")
    tab.fill("input[name=key]", KEY)
    tab.click("button[type=submit]")
    tab.wait_for_url("**/console/assistants")
    try:
        yield tab
    finally:
        context.close()


@pytest.fixture
def sdk(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=30) as client:
        yield client


def test_signing_in_with_a_wrong_key_is_refused(browser: Any, server: LiveServer) -> None:
    context = browser.new_context(base_url=f"http://127.0.0.1:{server.port}")
    tab = context.new_page()
    tab.goto("/console/threads")
    tab.fill("input[name=key]", "sk-wrong")
    tab.click("button[type=submit]")
    assert "not one this server accepts" in tab.locator("[role=alert]").inner_text()
    context.close()


def test_a_run_with_a_function_call_and_file_search(page: Any, sdk: openai.OpenAI) -> None:
    store = sdk.vector_stores.create(name="Zoo")
    sdk.vector_stores.file_batches.upload_and_poll(
        store.id, files=[("zebras.md", b"# Zebras\n\nZebras sleep standing up in the savanna.\n")]
    )
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    assistant = sdk.beta.assistants.create(
        model="gpt-4o",
        name="Zookeeper",
        tools=[weather, {"type": "file_search"}],  # type: ignore[list-item]
        tool_resources={"file_search": {"vector_store_ids": [store.id]}},
    )
    script = '[[call get_weather {"city": "Nairobi"}]] [[then call file_search {"query": "zebras sleep"}]]'
    thread = sdk.beta.threads.create(messages=[{"role": "user", "content": script}])
    run = sdk.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id, poll_interval_ms=20)
    assert run.required_action is not None
    call = run.required_action.submit_tool_outputs.tool_calls[0]
    run = sdk.beta.threads.runs.submit_tool_outputs_and_poll(
        thread_id=thread.id,
        run_id=run.id,
        tool_outputs=[{"tool_call_id": call.id, "output": "hot"}],
        poll_interval_ms=20,
    )
    assert run.status == "completed", run.last_error

    page.click("text=Threads")
    page.click(f"text={thread.id}")
    page.click(f"a[href$='/runs/{run.id}'] >> nth=0")
    page.wait_for_selector("text=function get_weather")
    timeline = page.locator("#timeline")
    assert "Nairobi" in timeline.inner_text() and "hot" in timeline.inner_text()
    assert "file_search" in timeline.inner_text() and "zebras.md" in timeline.inner_text()
    assert "What the model was sent" in page.content()
    page.locator("details.exchange >> nth=0").click()  # expand the first completion
    assert "get_weather" in page.locator("details.exchange >> nth=0").inner_text()

    # The cited answer links to the cited file.
    page.goto(f"/console/threads/{thread.id}")
    citation = page.locator("a.annotation.file_citation").first
    assert citation.count() == 1
    citation_target = citation.get_attribute("href")
    assert citation_target is not None and citation_target.startswith("/console/files/file-")


def test_a_live_run_completes_on_screen(page: Any, sdk: openai.OpenAI) -> None:
    assistant = sdk.beta.assistants.create(model="gpt-4o", name="Slow")
    thread = sdk.beta.threads.create(messages=[{"role": "user", "content": "[[tokens 40]] [[delay 50]]"}])
    run = sdk.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id)
    page.goto(f"/console/threads/{thread.id}/runs/{run.id}")
    assert page.locator("#timeline").get_attribute("data-live")  # the page follows the run
    page.wait_for_selector("#run-status .status.completed")
    page.wait_for_selector("#timeline[data-finished=true]")
    assert "message_creation" in page.locator("#timeline").inner_text()


def test_searching_a_vector_store(page: Any, sdk: openai.OpenAI) -> None:
    store = sdk.vector_stores.create(name="Birds")
    sdk.vector_stores.file_batches.upload_and_poll(
        store.id,
        files=[
            ("owls.md", b"# Owls\n\nOwls hunt at night and sleep in the day.\n"),
            ("gulls.md", b"# Gulls\n\nGulls eat fish at the harbour.\n"),
        ],
    )
    page.click("text=Vector stores")
    page.click("text=Birds")
    page.wait_for_selector("text=2 of 2 files ready")
    page.fill("input[name=q]", "when do owls hunt")
    page.click("button:has-text('Search')")
    page.wait_for_selector("ol.results > li")
    first = page.locator("ol.results > li").first
    assert "owls.md" in first.inner_text()
