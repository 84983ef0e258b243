"""Projects (issue 15): a key sees only its project's objects. Another
project's assistant, thread (its messages, runs and steps), file, vector store
(its files, batches and search) is answered exactly like a missing one, in
every route and list, and no tool of a run reaches another project's files.
Two official SDK clients with keys of two projects, on both databases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx2
import openai
import pytest
from alembic import command
from alembic.config import Config
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.engine import Connection

from app import cli_keys, db, orm, sandbox
from app.__main__ import build_parser, load_settings
from app.main import create_app
from app.services import api_keys, projects
from app.settings import Settings
from tests.conftest import error_of

pytestmark = pytest.mark.timeout(90)

ENV_KEY = "sk-env-compat-0001"
PREVIOUS_REVISION = "0007_model_requests"  # the revision before 0009_projects
SECRET = b"Team A's launch date is the ninth of March; codename BLUEBIRD."


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # A key cache of 0 s: every request reads the key afresh, so a revocation
    # shows at once (the cache itself is tested in test_key_ring_*).
    return settings.model_copy(update={"api_keys": [ENV_KEY], "key_cache_seconds": 0.0})


@pytest.fixture(autouse=True)
async def _end_sessions() -> AsyncIterator[None]:
    yield
    await sandbox.close_all()


async def _new_key(app: FastAPI, project: str) -> str:
    async with app.state.runtime.transaction() as session:
        key, _info = await api_keys.create(session, project)
    return key


def _sdk(http: httpx2.AsyncClient, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)


@dataclass
class TeamA:
    """Objects of project A, each kind once."""

    file: str
    store: str
    batch: str
    assistant: str
    thread: str
    message: str
    run: str
    step: str


async def _team_a(a: openai.AsyncOpenAI) -> TeamA:
    file = await a.files.create(file=("launch.txt", SECRET), purpose="assistants")
    store = await a.vector_stores.create(name="team-a", file_ids=[file.id])
    batch = await a.vector_stores.file_batches.create_and_poll(store.id, file_ids=[file.id])
    assistant = await a.beta.assistants.create(
        model="gpt-4o",
        instructions="A's secret instructions",
        tools=[{"type": "file_search"}, {"type": "code_interpreter"}],
        tool_resources={"file_search": {"vector_store_ids": [store.id]}, "code_interpreter": {"file_ids": [file.id]}},
    )
    thread = await a.beta.threads.create(messages=[{"role": "user", "content": "launch date? [[call file_search]]"}])
    run = await a.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    assert run.status == "completed", run.last_error
    steps = await a.beta.threads.runs.steps.list(run.id, thread_id=thread.id)
    message = (await a.beta.threads.messages.list(thread.id, order="asc")).data[0]
    return TeamA(file.id, store.id, batch.id, assistant.id, thread.id, message.id, run.id, steps.data[0].id)


Probe = Callable[[openai.AsyncOpenAI, TeamA], Awaitable[Any]]


def _probes(b_thread: str, b_store: str, b_assistant: str) -> list[tuple[str, Probe, Callable[[TeamA], str]]]:
    """(what, B's call on A's object, the exact 404 message a missing object gets)."""
    assistant = lambda t: f"No assistant found with id '{t.assistant}'."  # noqa: E731
    thread = lambda t: f"No thread found with id '{t.thread}'."  # noqa: E731
    file = lambda t: f"No such File object: {t.file}"  # noqa: E731
    store = lambda t: f"No vector store found with id '{t.store}'."  # noqa: E731
    vs = "vector_stores"
    return [
        ("assistant retrieve", lambda b, t: b.beta.assistants.retrieve(t.assistant), assistant),
        ("assistant update", lambda b, t: b.beta.assistants.update(t.assistant, name="mine"), assistant),
        ("assistant delete", lambda b, t: b.beta.assistants.delete(t.assistant), assistant),
        ("thread retrieve", lambda b, t: b.beta.threads.retrieve(t.thread), thread),
        ("thread update", lambda b, t: b.beta.threads.update(t.thread, metadata={"x": "y"}), thread),
        ("thread delete", lambda b, t: b.beta.threads.delete(t.thread), thread),
        ("message create", lambda b, t: b.beta.threads.messages.create(t.thread, role="user", content="hi"), thread),
        ("message list", lambda b, t: b.beta.threads.messages.list(t.thread), thread),
        ("message retrieve", lambda b, t: b.beta.threads.messages.retrieve(t.message, thread_id=t.thread), thread),
        (
            "message update",
            lambda b, t: b.beta.threads.messages.update(t.message, thread_id=t.thread, metadata={"x": "y"}),
            thread,
        ),
        ("message delete", lambda b, t: b.beta.threads.messages.delete(t.message, thread_id=t.thread), thread),
        ("run create", lambda b, t: b.beta.threads.runs.create(t.thread, assistant_id=b_assistant), thread),
        ("run list", lambda b, t: b.beta.threads.runs.list(t.thread), thread),
        ("run retrieve", lambda b, t: b.beta.threads.runs.retrieve(t.run, thread_id=t.thread), thread),
        (
            "run update",
            lambda b, t: b.beta.threads.runs.update(t.run, thread_id=t.thread, metadata={"x": "y"}),
            thread,
        ),
        ("run cancel", lambda b, t: b.beta.threads.runs.cancel(t.run, thread_id=t.thread), thread),
        (
            "run submit_tool_outputs",
            lambda b, t: b.beta.threads.runs.submit_tool_outputs(t.run, thread_id=t.thread, tool_outputs=[]),
            thread,
        ),
        ("run steps list", lambda b, t: b.beta.threads.runs.steps.list(t.run, thread_id=t.thread), thread),
        (
            "run step retrieve",
            lambda b, t: b.beta.threads.runs.steps.retrieve(t.step, thread_id=t.thread, run_id=t.run),
            thread,
        ),
        (
            "run with A's assistant",
            lambda b, t: b.beta.threads.runs.create(b_thread, assistant_id=t.assistant),
            assistant,
        ),
        (
            "thread and run with A's assistant",
            lambda b, t: b.beta.threads.create_and_run(assistant_id=t.assistant),
            assistant,
        ),
        ("file retrieve", lambda b, t: b.files.retrieve(t.file), file),
        ("file content", lambda b, t: b.files.content(t.file), file),
        ("file delete", lambda b, t: b.files.delete(t.file), file),
        ("store retrieve", lambda b, t: getattr(b, vs).retrieve(t.store), store),
        ("store update", lambda b, t: getattr(b, vs).update(t.store, name="mine"), store),
        ("store delete", lambda b, t: getattr(b, vs).delete(t.store), store),
        ("store search", lambda b, t: getattr(b, vs).search(t.store, query="launch date"), store),
        ("store file add", lambda b, t: getattr(b, vs).files.create(t.store, file_id=t.file), store),
        ("store file list", lambda b, t: getattr(b, vs).files.list(t.store), store),
        ("store file retrieve", lambda b, t: getattr(b, vs).files.retrieve(t.file, vector_store_id=t.store), store),
        (
            "store file update",
            lambda b, t: getattr(b, vs).files.update(t.file, vector_store_id=t.store, attributes={"x": "y"}),
            store,
        ),
        ("store file delete", lambda b, t: getattr(b, vs).files.delete(t.file, vector_store_id=t.store), store),
        ("store file content", lambda b, t: getattr(b, vs).files.content(t.file, vector_store_id=t.store), store),
        ("batch retrieve", lambda b, t: getattr(b, vs).file_batches.retrieve(t.batch, vector_store_id=t.store), store),
        ("batch cancel", lambda b, t: getattr(b, vs).file_batches.cancel(t.batch, vector_store_id=t.store), store),
        (
            "batch files",
            lambda b, t: getattr(b, vs).file_batches.list_files(t.batch, vector_store_id=t.store),
            store,
        ),
        # A's file or store named in B's own objects: as a missing one would be.
        ("A's file into B's store", lambda b, t: getattr(b, vs).files.create(b_store, file_id=t.file), file),
        ("A's file in a new store", lambda b, t: getattr(b, vs).create(file_ids=[t.file]), file),
        ("A's file in a batch", lambda b, t: getattr(b, vs).file_batches.create(b_store, file_ids=[t.file]), file),
        (
            "A's file attached to a message",
            lambda b, t: b.beta.threads.messages.create(
                b_thread,
                role="user",
                content="see",
                attachments=[{"file_id": t.file, "tools": [{"type": "file_search"}]}],
            ),
            file,
        ),
        (
            "A's image in a message",
            lambda b, t: b.beta.threads.messages.create(
                b_thread, role="user", content=[{"type": "image_file", "image_file": {"file_id": t.file}}]
            ),
            file,
        ),
        (
            "A's file in an assistant's tool_resources",
            lambda b, t: b.beta.assistants.create(
                model="gpt-4o", tool_resources={"code_interpreter": {"file_ids": [t.file]}}
            ),
            file,
        ),
        (
            "A's store in an assistant's tool_resources",
            lambda b, t: b.beta.assistants.update(
                b_assistant, tool_resources={"file_search": {"vector_store_ids": [t.store]}}
            ),
            store,
        ),
        (
            "A's store in a thread's tool_resources",
            lambda b, t: b.beta.threads.create(tool_resources={"file_search": {"vector_store_ids": [t.store]}}),
            store,
        ),
        (
            "A's file in a new thread's store",
            lambda b, t: b.beta.threads.create(
                tool_resources={"file_search": {"vector_stores": [{"file_ids": [t.file]}]}}
            ),
            file,
        ),
    ]


async def test_another_projects_objects_are_missing_everywhere(app: FastAPI, http: httpx2.AsyncClient) -> None:
    a = _sdk(http, await _new_key(app, "team-a"))
    b = _sdk(http, await _new_key(app, "team-b"))
    team_a = await _team_a(a)
    b_thread = (await b.beta.threads.create()).id
    b_store = (await b.vector_stores.create(name="team-b")).id
    b_assistant = (await b.beta.assistants.create(model="gpt-4o")).id

    wrong = []
    for what, call, message in _probes(b_thread, b_store, b_assistant):
        try:
            await call(b, team_a)
        except openai.NotFoundError as exc:
            if error_of(exc)["message"] != message(team_a):
                wrong.append(f"{what}: {error_of(exc)['message']!r}")
            continue
        wrong.append(f"{what}: answered")
    assert not wrong, "\n".join(wrong)

    # Lists show the project's own objects only; A's are all still there.
    assert [x.id for x in (await b.beta.assistants.list()).data] == [b_assistant]
    assert [x.id for x in (await b.vector_stores.list()).data] == [b_store]
    assert (await b.files.list()).data == []
    assert (await a.beta.assistants.retrieve(team_a.assistant)).instructions == "A's secret instructions"
    assert (await a.files.content(team_a.file)).content == SECRET
    assert [x.id for x in (await a.vector_stores.list()).data] == [team_a.store]
    # The keys of ASSISTANTS_API_KEYS are a third project (the default one).
    env = _sdk(http, ENV_KEY)
    assert (await env.beta.assistants.list()).data == [] and (await env.files.list()).data == []


async def _plant(app: FastAPI, thread_id: str, resources: dict[str, Any]) -> None:
    """Name A's objects in B's thread behind the API's back (as a row written
    before the checks existed would): the tools must still refuse them."""
    async with app.state.runtime.transaction() as session:
        thread = await session.get(orm.Thread, thread_id)
        assert thread is not None
        thread.tool_resources = resources


async def test_tools_never_reach_another_projects_files(app: FastAPI, http: httpx2.AsyncClient) -> None:
    a = _sdk(http, await _new_key(app, "team-a"))
    b = _sdk(http, await _new_key(app, "team-b"))
    team_a = await _team_a(a)
    assistant = await b.beta.assistants.create(
        model="gpt-4o", tools=[{"type": "file_search"}, {"type": "code_interpreter"}]
    )
    thread = await b.beta.threads.create()
    await _plant(
        app,
        thread.id,
        {"file_search": {"vector_store_ids": [team_a.store]}, "code_interpreter": {"file_ids": [team_a.file]}},
    )

    await b.beta.threads.messages.create(thread.id, role="user", content="launch date? [[call file_search]]")
    run = await b.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    assert run.status == "completed", run.last_error
    steps = await b.beta.threads.runs.steps.list(run.id, thread_id=thread.id)
    calls = [c for s in steps.data if s.type == "tool_calls" for c in s.step_details.tool_calls]  # type: ignore[union-attr]
    assert [c.type for c in calls] == ["file_search"] and not calls[0].file_search.results  # type: ignore[union-attr]

    code = "import os\nprint(sorted(os.listdir('/mnt/data')))\n_ = open('/mnt/data/b.txt', 'w').write('b')"
    await b.beta.threads.messages.create(thread.id, role="user", content=f"Run this.\n```python\n{code}\n```")
    run = await b.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id)
    assert run.status == "completed", run.last_error
    steps = await b.beta.threads.runs.steps.list(run.id, thread_id=thread.id)
    (call,) = [c for s in steps.data if s.type == "tool_calls" for c in s.step_details.tool_calls]  # type: ignore[union-attr]
    logs = [o.logs for o in call.code_interpreter.outputs if o.type == "logs"]  # type: ignore[union-attr]
    assert logs == ["[]\n"], logs  # launch.txt was not copied in
    # What the run wrote belongs to B's project.
    (made,) = [f for f in (await b.files.list()).data if f.purpose == "assistants_output"]
    assert (await b.files.content(made.id)).content == b"b"
    with pytest.raises(openai.NotFoundError):
        await a.files.retrieve(made.id)


async def test_revoked_and_unknown_keys_get_openais_401(app: FastAPI, http: httpx2.AsyncClient) -> None:
    key = await _new_key(app, "team-a")
    sdk = _sdk(http, key)
    await sdk.beta.assistants.create(model="gpt-4o")
    async with app.state.runtime.transaction() as session:
        await api_keys.revoke(session, key[: api_keys.VISIBLE_CHARS])
    with pytest.raises(openai.AuthenticationError) as exc:
        await sdk.beta.assistants.list()
    assert error_of(exc) == {
        "message": f"Incorrect API key provided: sk-***{key[-4:]}.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    # The key from ASSISTANTS_API_KEYS still works beside the stored keys.
    assert (await _sdk(http, ENV_KEY).beta.assistants.list()).data == []


async def test_cli_creates_lists_and_revokes_keys(
    http: httpx2.AsyncClient, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    def cli(*argv: str) -> int:
        args = build_parser().parse_args(["keys", *argv, "--database-url", database_url])
        return cli_keys.main(load_settings(args), args)

    assert await asyncio.to_thread(cli, "create", "--project", "team-cli") == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk-proj-") and len(key) > 40
    sdk = _sdk(http, key)
    assistant = await sdk.beta.assistants.create(model="gpt-4o", name="made with a CLI key")
    assert [x.id for x in (await sdk.beta.assistants.list()).data] == [assistant.id]

    assert await asyncio.to_thread(cli, "list") == 0
    listing = capsys.readouterr().out
    assert key[: api_keys.VISIBLE_CHARS] in listing and "team-cli" in listing and key not in listing

    assert await asyncio.to_thread(cli, "revoke", "sk-proj-no-such") == 1
    assert await asyncio.to_thread(cli, "revoke", key[: api_keys.VISIBLE_CHARS - 2]) == 0
    with pytest.raises(openai.AuthenticationError) as exc:
        await sdk.beta.assistants.list()
    assert error_of(exc)["code"] == "invalid_api_key"
    capsys.readouterr()
    assert await asyncio.to_thread(cli, "list") == 0
    (line,) = [row for row in capsys.readouterr().out.splitlines() if "team-cli" in row]
    assert line.split()[-1] != "-"  # a revoked-at time


async def test_key_ring_caches_for_its_ttl_then_honours_revocation(app: FastAPI) -> None:
    key = await _new_key(app, "team-a")
    now = [100.0]
    ring = api_keys.KeyRing(app.state.runtime.engine, [ENV_KEY], ttl=10.0, clock=lambda: now[0])
    project = await ring.project_of(key)
    assert project is not None and project.name == "team-a"
    assert await ring.project_of(ENV_KEY) == projects.DEFAULT
    assert await ring.project_of("sk-proj-unknown") is None
    async with app.state.runtime.transaction() as session:
        await api_keys.revoke(session, key)
    now[0] = 109.0
    assert await ring.project_of(key) == project  # within the TTL: still cached
    now[0] = 110.5
    assert await ring.project_of(key) is None
    assert not await ring.is_open()


async def test_an_open_server_closes_once_a_key_exists(settings: Settings) -> None:
    application = create_app(settings.model_copy(update={"api_keys": []}))
    async with (
        application.router.lifespan_context(application),
        httpx2.AsyncClient(transport=httpx2.ASGITransport(app=application), base_url="http://testserver") as http,
    ):
        anyone = _sdk(http, "sk-anything")
        before = await anyone.beta.assistants.create(model="gpt-4o", name="made while open")
        key = await _new_key(application, "team-a")
        with pytest.raises(openai.AuthenticationError):
            await anyone.beta.assistants.list()
        assert (await _sdk(http, key).beta.assistants.list()).data == []
        # What was made while the server was open is the default project's.
        default = await _new_key(application, projects.DEFAULT_NAME)
        assert [x.id for x in (await _sdk(http, default).beta.assistants.list()).data] == [before.id]
        async with application.state.runtime.transaction() as session:
            await api_keys.revoke(session, key)
            await api_keys.revoke(session, default)
        with pytest.raises(openai.AuthenticationError):  # revoking every key does not open it again
            await anyone.beta.assistants.list()


def _migrate_to(connection: Connection, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(db.MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    if revision == "head":
        command.upgrade(config, revision)
    else:
        command.downgrade(config, revision)


async def test_migration_puts_existing_objects_in_the_default_project(database_url: str) -> None:
    engine = db.create_engine(database_url)
    try:
        await db.migrate(engine)
        async with engine.begin() as connection:
            await connection.run_sync(_migrate_to, PREVIOUS_REVISION)
            await connection.execute(
                text("INSERT INTO threads (id, seq, created_at, metadata) VALUES ('thread_old', 1, 1, '{}')")
            )
        async with engine.begin() as connection:
            await connection.run_sync(_migrate_to, "head")
        async with db.create_sessionmaker(engine)() as session:
            thread = await session.get(orm.Thread, "thread_old")
            assert thread is not None and thread.project_id == projects.DEFAULT_ID
            default = await session.get(orm.Project, projects.DEFAULT_ID)
            assert default is not None and default.name == projects.DEFAULT_NAME
    finally:
        await engine.dispose()


async def test_the_console_shows_the_keys_project_only(app: FastAPI, http: httpx2.AsyncClient) -> None:
    key_a = await _new_key(app, "team-a")
    a, b = _sdk(http, key_a), _sdk(http, await _new_key(app, "team-b"))
    await a.beta.assistants.create(model="gpt-4o", name="Alpha helper")
    other = await b.beta.assistants.create(model="gpt-4o", name="Bravo helper")
    upload = await b.files.create(file=("bravo.txt", b"B only"), purpose="assistants")
    signed_in = await http.post("/console/login", data={"key": key_a, "next": "/console/assistants"})
    assert signed_in.status_code == 303
    http.cookies.set("assistants_console_key", key_a)
    page = (await http.get("/console/assistants")).text
    assert "Alpha helper" in page and "Bravo helper" not in page and "project team-a" in page
    assert (await http.get(f"/console/assistants/{other.id}")).status_code == 404
    assert (await http.get(f"/console/files/{upload.id}")).status_code == 404
    assert "bravo.txt" not in (await http.get("/console/files")).text


async def test_v1_routes_keep_projects_apart(app: FastAPI, http: httpx2.AsyncClient) -> None:
    key_a, key_b = await _new_key(app, "team-a"), await _new_key(app, "team-b")
    a, b = _sdk(http, key_a), _sdk(http, key_b)
    upload = await a.files.create(file=("a.txt", b"A"), purpose="assistants")
    assistant = await a.beta.assistants.create(
        model="gpt-4o", tool_resources={"code_interpreter": {"file_ids": [upload.id]}}
    )
    thread = await a.beta.threads.create(messages=[{"role": "user", "content": "hi"}])
    message = (await a.beta.threads.messages.list(thread.id)).data[0]
    own = await b.beta.assistants.create(model="gpt-4o")
    v1 = {"OpenAI-Beta": "assistants=v1", "Authorization": f"Bearer {key_b}"}
    for method, path, body, expected in [
        ("GET", f"/v1/assistants/{assistant.id}/files", None, f"No assistant found with id '{assistant.id}'."),
        ("POST", f"/v1/assistants/{assistant.id}", {"name": "x"}, f"No assistant found with id '{assistant.id}'."),
        ("POST", f"/v1/assistants/{own.id}/files", {"file_id": upload.id}, f"No such File object: {upload.id}"),
        (
            "GET",
            f"/v1/threads/{thread.id}/messages/{message.id}/files",
            None,
            f"No thread found with id '{thread.id}'.",
        ),
        ("GET", f"/v1/threads/{thread.id}/messages", None, f"No thread found with id '{thread.id}'."),
    ]:
        response = await http.request(method, path, json=body, headers=v1)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"]["message"] == expected, path
