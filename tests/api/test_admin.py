"""/admin (test support), in-process on both databases: reset wipes
everything (the keyword index included), rules are validated with clear
400s, the model-request log shows what the model was sent."""

from __future__ import annotations

from pathlib import Path

import httpx2
import openai
import pytest

from app.main import create_app
from app.settings import Settings

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"admin_api": True})


async def test_reset_forgets_every_object_and_the_search_index(
    client: openai.AsyncOpenAI, http: httpx2.AsyncClient
) -> None:
    store = await client.vector_stores.create(name="zoo")
    await client.vector_stores.file_batches.upload_and_poll(
        store.id, files=[("zebras.md", b"# Zebras\n\nZebras sleep standing up in the savanna.\n")]
    )
    assistant = await client.beta.assistants.create(model="gpt-4o")
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "hi"}])
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    assert run.status == "completed"
    assert (await http.post("/admin/reset")).json() == {"object": "admin.reset", "reset": True}

    assert (await client.beta.assistants.list()).data == []
    assert (await client.vector_stores.list()).data == []
    assert (await client.files.list()).data == []
    with pytest.raises(openai.NotFoundError):
        await client.beta.threads.retrieve(thread.id)
    # The store's chunks and their keyword index are gone too: a new store
    # with the same words finds only its own file.
    fresh = await client.vector_stores.create(name="again")
    await client.vector_stores.file_batches.upload_and_poll(
        fresh.id, files=[("savanna.md", b"# Savanna\n\nZebras graze in the savanna at dawn.\n")]
    )
    hits = await client.vector_stores.search(fresh.id, query="zebras savanna")
    assert [hit.filename for hit in hits.data] == ["savanna.md"]


async def test_scripted_rule_answers_and_model_requests_show_the_prompt(
    client: openai.AsyncOpenAI, http: httpx2.AsyncClient
) -> None:
    assistant = await client.beta.assistants.create(model="gpt-4o", instructions="Answer in French.")
    rule = await http.post(
        "/admin/offline/rules", json={"match": {"assistant_id": assistant.id}, "respond": {"text": "Bonjour."}}
    )
    assert rule.status_code == 200 and rule.json()["id"].startswith("rule_")
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "Hello"}])
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    messages = await client.beta.threads.messages.list(thread.id, order="desc", limit=1)
    assert messages.data[0].content[0].text.value == "Bonjour."  # type: ignore[union-attr]

    log = (await http.get("/admin/model_requests", params={"run_id": run.id})).json()["data"]
    assert len(log) == 1
    assert log[0]["request"]["messages"] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
    ]
    assert log[0]["response"]["text"] == "Bonjour."
    assert log[0]["response"]["usage"]["completion_tokens"] == run.usage.completion_tokens  # type: ignore[union-attr]
    listed = (await http.get("/admin/offline/rules")).json()["data"]
    assert [(item["id"], item["used"]) for item in listed] == [(rule.json()["id"], 1)]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"respond": "x", "rounds": ["y"]}, "either 'respond'"),
        ({"respond": {"tool_calls": [{"nothing": 1}]}}, "rounds[0].tool_calls[0]"),
        ({"respond": "x", "match": {"message": "("}}, "not a valid regular expression"),
        ({"respond": {"fail": "explode"}}, "rounds[0].fail"),
        ({"respond": {"refusal": ["no"]}}, "rounds[0].refusal must be a non-empty string"),
        ({"respond": {"refusal": ""}}, "rounds[0].refusal must be a non-empty string"),
        ({"respond": "x", "times": -1}, "times must be a non-negative integer"),
        ({"respond": "x", "colour": "blue"}, "unknown field"),
        ([1, 2], "a rule must be a JSON object"),
    ],
)
async def test_bad_rules_are_400_with_the_field_named(http: httpx2.AsyncClient, body: object, needle: str) -> None:
    response = await http.post("/admin/offline/rules", json=body)
    assert response.status_code == 400
    assert needle in response.json()["error"]["message"]


async def test_rules_can_be_removed_and_unknown_ones_are_404(http: httpx2.AsyncClient) -> None:
    rule_id = (await http.post("/admin/offline/rules", json={"respond": "x"})).json()["id"]
    assert (await http.delete(f"/admin/offline/rules/{rule_id}")).json()["deleted"] is True
    missing = await http.delete(f"/admin/offline/rules/{rule_id}")
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == f"No offline rule found with id '{rule_id}'."


async def test_without_the_setting_there_is_no_admin_api(database_url: str, tmp_path: Path) -> None:
    app = create_app(Settings(database_url=database_url, data_dir=tmp_path))
    async with app.router.lifespan_context(app):
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as raw:
            response = await raw.post("/admin/reset")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "Invalid URL (POST /admin/reset)"


async def test_a_failed_completion_is_logged_with_its_error(
    client: openai.AsyncOpenAI, http: httpx2.AsyncClient
) -> None:
    assistant = await client.beta.assistants.create(model="gpt-4o")
    thread = await client.beta.threads.create(messages=[{"role": "user", "content": "[[fail rate_limit after 2]] hi"}])
    run = await client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    assert run.status == "failed"
    # Written with the run's own ending (one commit), so it is there as soon as the run has ended.
    (logged,) = (await http.get("/admin/model_requests", params={"run_id": run.id})).json()["data"]
    assert logged["response"]["error"]["code"] == "rate_limit_exceeded"
    assert logged["response"]["finish_reason"] is None


async def test_a_chat_completion_outside_a_run_is_logged(client: openai.AsyncOpenAI, http: httpx2.AsyncClient) -> None:
    """Logged by model_requests.add: a row built without the ORM's
    constructor (core_rows.record), added to a session and flushed by it."""
    await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello there"}])
    (logged,) = (await http.get("/admin/model_requests")).json()["data"]
    assert logged["request"]["messages"] == [{"role": "user", "content": "Hello there"}]
