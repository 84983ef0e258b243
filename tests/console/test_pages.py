"""The console's pages without a browser, in-process on both databases:
sign-in, every page renders what the API stored, 404s are pages."""

from __future__ import annotations

import httpx2
import openai
import pytest

from app.settings import Settings

pytestmark = pytest.mark.timeout(60)
KEY = "sk-console-key"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"api_keys": [KEY]})


@pytest.fixture
async def sdk(http: httpx2.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=http, max_retries=0)


async def _signed_in(http: httpx2.AsyncClient) -> None:
    response = await http.post("/console/login", data={"key": KEY, "next": "/console/threads"})
    assert response.status_code == 303 and response.headers["location"] == "/console/threads"
    http.cookies.set("assistants_console_key", KEY)


async def test_pages_need_a_key_and_a_wrong_one_is_refused(http: httpx2.AsyncClient) -> None:
    page = await http.get("/console/assistants")
    assert page.status_code == 303 and page.headers["location"] == "/console/login?next=/console/assistants"
    refused = await http.post("/console/login", data={"key": "sk-wrong"})
    assert refused.status_code == 401 and "not one this server accepts" in refused.text
    await _signed_in(http)
    assert (await http.get("/console/assistants")).status_code == 200


async def test_a_run_page_shows_steps_tool_calls_and_what_the_model_saw(
    sdk: openai.AsyncOpenAI, http: httpx2.AsyncClient
) -> None:
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    assistant = await sdk.beta.assistants.create(
        model="gpt-4o", name="Forecaster", instructions="Use <tools> & be brief.", tools=[weather]
    )
    thread = await sdk.beta.threads.create(
        messages=[{"role": "user", "content": '[[call get_weather {"city": "Tokyo"}]]'}], metadata={"team": "qa"}
    )
    run = await sdk.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    assert run.status == "requires_action" and run.required_action is not None
    call = run.required_action.submit_tool_outputs.tool_calls[0]
    run = await sdk.beta.threads.runs.submit_tool_outputs_and_poll(
        thread_id=thread.id, run_id=run.id, tool_outputs=[{"tool_call_id": call.id, "output": "22 degrees"}]
    )
    assert run.status == "completed"
    await _signed_in(http)

    page = (await http.get(f"/console/threads/{thread.id}/runs/{run.id}")).text
    assert "function get_weather" in page and "&#34;city&#34;: &#34;Tokyo&#34;" in page and "22 degrees" in page
    assert "What the model was sent" in page and "completion 2" in page
    assert "Use &lt;tools&gt; &amp; be brief." in page  # the system prompt, escaped
    thread_page = (await http.get(f"/console/threads/{thread.id}")).text
    assert "Tool results: get_weather -&gt; 22 degrees" in thread_page and "team=qa" in thread_page
    assert thread.id in (await http.get("/console/threads")).text
    assert "Forecaster" in (await http.get("/console/assistants")).text
    assert "get_weather" in (await http.get(f"/console/assistants/{assistant.id}")).text


async def test_a_refusal_shows_as_the_models_words_not_json(sdk: openai.AsyncOpenAI, http: httpx2.AsyncClient) -> None:
    assistant = await sdk.beta.assistants.create(model="gpt-4o")
    thread = await sdk.beta.threads.create(messages=[{"role": "user", "content": "[[refuse I won't do <that>.]]"}])
    run = await sdk.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    assert run.status == "completed"
    await _signed_in(http)

    page = (await http.get(f"/console/threads/{thread.id}")).text
    assert "Refused: I won&#39;t do &lt;that&gt;." in page  # the words, escaped
    assert "&#34;refusal&#34;" not in page  # not the part as JSON


async def test_vector_store_page_counts_chunks_and_searches(sdk: openai.AsyncOpenAI, http: httpx2.AsyncClient) -> None:
    store = await sdk.vector_stores.create(name="Zoo")
    await sdk.vector_stores.file_batches.upload_and_poll(
        store.id, files=[("zebras.md", b"# Zebras\n\nZebras sleep standing up in the savanna.\n")]
    )
    await _signed_in(http)
    page = (await http.get(f"/console/vector_stores/{store.id}")).text
    assert "1 of 1 files ready" in page
    found = (await http.get(f"/console/vector_stores/{store.id}", params={"q": "where do zebras sleep"})).text
    assert "zebras.md" in found and "standing up" in found
    files = (await http.get("/console/files")).text
    assert "zebras.md" in files


async def test_unknown_objects_are_404_pages(http: httpx2.AsyncClient) -> None:
    await _signed_in(http)
    page = await http.get("/console/threads/thread_nope/runs/run_nope")
    assert page.status_code == 404 and "text/html" in page.headers["content-type"]
    assert "No run found with id" in page.text or "No thread found with id" in page.text


async def test_a_runs_live_feed_ends_at_once_for_an_ended_run(
    sdk: openai.AsyncOpenAI, http: httpx2.AsyncClient
) -> None:
    """The run page's feed (/live) of a run that ended before the page
    asked: its end at once. A run that is not there: a 404 page."""
    assistant = await sdk.beta.assistants.create(model="gpt-4o")
    thread = {"messages": [{"role": "user", "content": "Hello"}]}
    run = await sdk.beta.threads.create_and_run_poll(assistant_id=assistant.id, thread=thread)  # type: ignore[arg-type]
    assert run.status == "completed"
    await _signed_in(http)
    feed = await http.get(f"/console/threads/{run.thread_id}/runs/{run.id}/live")
    assert feed.status_code == 200 and feed.text == "event: end\ndata: done\n\n"
    missing = await http.get(f"/console/threads/{run.thread_id}/runs/run_nope/live")
    assert missing.status_code == 404 and "text/html" in missing.headers["content-type"]
