"""The HTTP surface every resource shares: request ids, unknown URLs, body
and query validation, the OpenAI-Beta check, API keys, the Azure paths, and
the rule that the server never answers 422 nor 5xx to bad input."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import pytest
from fastapi import FastAPI

from app.errors import JSON_PARSE_MESSAGE
from app.main import create_app
from app.settings import Settings
from tests import oas
from tests.conftest import error_of

BETA = {"OpenAI-Beta": "assistants=v2"}
JSON = {**BETA, "content-type": "application/json"}
REQUEST_ID = re.compile(r"^req_[0-9a-f]{32}$")
GOOD_KEY = "sk-good"
MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
V1_FILES = (
    "The v1 Assistants API has been deprecated. See the migration guide for more information: "
    "https://platform.openai.com/docs/assistants/migration."
)


def envelope(message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}


def assert_error(response: httpx2.Response, status: int, message: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert REQUEST_ID.match(response.headers["x-request-id"])
    body: dict[str, Any] = response.json()
    oas.validate(body, "ErrorResponse")
    if message is not None:
        assert body["error"]["message"] == message
    return body["error"]


@pytest.fixture
async def thread_id(http: httpx2.AsyncClient) -> str:
    response = await http.post("/v1/threads", headers=BETA)
    thread: str = response.json()["id"]
    return thread


@pytest.fixture
async def keyed_app(settings: Settings) -> AsyncIterator[FastAPI]:
    """The same app, but with API keys configured."""
    application = create_app(settings.model_copy(update={"api_keys": [GOOD_KEY, "sk-other"]}))
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def keyed_http(keyed_app: FastAPI) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(
        transport=httpx2.ASGITransport(app=keyed_app), base_url="http://testserver"
    ) as client:
        yield client


# --- request ids ---------------------------------------------------------------


async def test_every_response_has_a_request_id(client: openai.AsyncOpenAI, http: httpx2.AsyncClient) -> None:
    seen = []
    for method, path, kwargs, status in [
        ("POST", "/v1/threads", {}, 200),
        ("GET", "/v1/threads/thread_missing", {}, 404),
        ("GET", "/v1/threads/asst_wrongprefix", {}, 400),
        ("POST", "/v1/threads", {"json": {"metadata": 5}}, 400),
        ("POST", "/v1/threads", {"content": b"{bad"}, 400),
        ("GET", "/v1/nope", {}, 404),
        ("GET", "/", {}, 404),
        ("DELETE", "/v1/assistants", {}, 404),
        ("GET", "/v1/threads/thread_%00", {}, 400),
        ("GET", "/v1/assistants/asst_x/files", {}, 400),
    ]:
        response = await http.request(method, path, headers=JSON, **kwargs)
        assert response.status_code == status, (path, response.text)
        assert REQUEST_ID.match(response.headers.get("x-request-id", "")), (path, response.headers)
        seen.append(response.headers["x-request-id"])
    assert len(set(seen)) == len(seen)

    # The SDK surfaces it on results and on errors.
    thread = await client.beta.threads.create()
    assert thread._request_id is not None and REQUEST_ID.match(thread._request_id)
    with pytest.raises(openai.NotFoundError) as exc:
        await client.beta.threads.retrieve("thread_missing")
    assert exc.value.request_id is not None and REQUEST_ID.match(exc.value.request_id)


async def test_unexpected_exception_is_a_500_envelope_with_request_id(
    app: FastAPI, http: httpx2.AsyncClient, client: openai.AsyncOpenAI
) -> None:
    async def explode() -> None:
        raise RuntimeError("a bug")

    # A route of this test's own: nothing the server serves may fail like this.
    app.add_api_route("/v1/explode", explode, methods=["GET"])
    response = await http.get("/v1/explode")
    error = assert_error(response, 500, "The server had an error while processing your request. Sorry about that!")
    assert error["type"] == "server_error" and "a bug" not in response.text
    with pytest.raises(openai.InternalServerError) as exc:
        await client.get("/explode", cast_to=object)
    assert exc.value.request_id is not None and REQUEST_ID.match(exc.value.request_id)


# --- URLs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/nope"),
        ("POST", "/v1/nope/deeper"),
        ("GET", "/nope"),
        ("PUT", "/v1/threads"),
        ("PATCH", "/v1/assistants/asst_x"),
        ("GET", "/v1/threads"),  # OpenAI has no public thread list
        ("DELETE", "/v1/threads/thread_x/messages"),
        ("GET", "/openai/nope"),
        ("GET", "/openai/v1/nope"),
    ],
)
async def test_unknown_url(http: httpx2.AsyncClient, method: str, path: str) -> None:
    response = await http.request(method, path, headers=BETA)
    assert response.json() == envelope(f"Invalid URL ({method} {path})")
    assert_error(response, 404)


async def test_unknown_url_through_the_sdk(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        await client.get("/nope", cast_to=object)
    assert error_of(exc)["message"] == "Invalid URL (GET /v1/nope)"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/assistants/asst_abc/files"),
        ("POST", "/v1/assistants/asst_abc/files"),
        ("GET", "/v1/assistants/asst_abc/files/file-abc"),
        ("DELETE", "/v1/assistants/asst_abc/files/file-abc"),
        ("GET", "/v1/threads/thread_abc/messages/msg_abc/files"),
        ("GET", "/openai/threads/thread_abc/messages/msg_abc/files/file-abc"),
    ],
)
async def test_v1_file_endpoints_say_v1_is_gone(http: httpx2.AsyncClient, method: str, path: str) -> None:
    """go-openai still exposes v1's assistant and message file endpoints."""
    assert_error(await http.request(method, path, headers=BETA), 400, V1_FILES)


@pytest.mark.parametrize(
    "url",
    [
        "/v1/threads/thread_%00abc",
        "/v1/assistants/asst_x%00",
        "/v1/threads/thread_abc/messages/msg_%00",
        "/v1/threads/thread_abc/messages?after=msg_%00",
        "/v1/threads/thread_abc/messages?run_id=run_%00",
        "/v1/files/file-%00",
    ],
)
async def test_nul_in_the_url_is_400_on_every_engine(http: httpx2.AsyncClient, url: str) -> None:
    """PostgreSQL refuses NUL in any text parameter: it must never reach a query."""
    error = assert_error(await http.get(url, headers=BETA), 400)
    assert error["message"] == f"Invalid URL (GET {url}): null characters (%00) are not allowed."


# --- bodies ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"{bad", id="not-json"),
        pytest.param(b'{"metadata": {"a": "b"},}', id="trailing-comma"),
        pytest.param(b'{"metadata": {"a": "b"}', id="truncated"),
        pytest.param(b"{'metadata': {}}", id="single-quotes"),
        pytest.param(b"   ", id="blank"),
        pytest.param(b'{"metadata": {"a": "\xff\xfe"}}', id="invalid-utf8"),
        pytest.param(b'{"metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", id="nested-100k"),
    ],
)
async def test_malformed_json_is_400(http: httpx2.AsyncClient, thread_id: str, content: bytes) -> None:
    for path in ("/v1/threads", f"/v1/threads/{thread_id}/messages", "/v1/assistants"):
        response = await http.post(path, headers=JSON, content=content)
        assert response.json() == envelope(JSON_PARSE_MESSAGE)
        assert_error(response, 400)


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (b"[]", "an array"),
        (b'[{"role": "user", "content": "x"}]', "an array"),
        (b'"hello"', "a string"),
        (b"42", "an integer"),
        (b"4.2", "a decimal"),
        (b"true", "a boolean"),
    ],
)
async def test_body_that_is_not_an_object_is_400(
    http: httpx2.AsyncClient, thread_id: str, content: bytes, kind: str
) -> None:
    message_id = (
        await http.post(f"/v1/threads/{thread_id}/messages", headers=BETA, json={"role": "user", "content": "x"})
    ).json()["id"]
    for path in (
        "/v1/threads",
        f"/v1/threads/{thread_id}",
        f"/v1/threads/{thread_id}/messages",
        f"/v1/threads/{thread_id}/messages/{message_id}",
        "/v1/assistants",
    ):
        response = await http.post(path, headers=JSON, content=content)
        assert response.json() == envelope(
            f"Invalid type: expected an object, but got {kind} instead.", code="invalid_type"
        ), path
        assert_error(response, 400)


async def test_body_with_a_non_json_content_type_is_400(http: httpx2.AsyncClient, thread_id: str) -> None:
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        response = await http.post(
            f"/v1/threads/{thread_id}/messages",
            headers={**BETA, "content-type": content_type},
            content=b'{"role": "user", "content": "x"}',
        )
        assert_error(response, 400, JSON_PARSE_MESSAGE)


async def test_deep_nesting_is_400_not_500(http: httpx2.AsyncClient) -> None:
    """Past what the serializer can render back, nesting is refused up front."""
    parameters: Any = {"type": "object"}
    for _ in range(300):
        parameters = {"type": "object", "properties": {"x": parameters}}
    response = await http.post(
        "/v1/assistants",
        headers=BETA,
        json={"model": "m", "tools": [{"type": "function", "function": {"name": "f", "parameters": parameters}}]},
    )
    error = assert_error(response, 400)
    assert error["code"] == "invalid_value" and error["param"].startswith("tools[0].function.parameters.properties.x")
    assert "nesting too deep" in error["message"]
    # Real-world schemas are far shallower and pass.
    shallow: Any = {"type": "string"}
    for _ in range(20):
        shallow = {"type": "object", "properties": {"x": shallow}}
    response = await http.post(
        "/v1/assistants",
        headers=BETA,
        json={"model": "m", "tools": [{"type": "function", "function": {"name": "f", "parameters": shallow}}]},
    )
    assert response.status_code == 200, response.text


# --- query parameters ------------------------------------------------------------


LIST_ERRORS = [
    pytest.param(
        "limit=101",
        "limit",
        "integer_above_max_value",
        "Invalid 'limit': integer above maximum value. Expected a value <= 100, but got 101 instead.",
        id="limit-101",
    ),
    pytest.param(
        "limit=0",
        "limit",
        "integer_below_min_value",
        "Invalid 'limit': integer below minimum value. Expected a value >= 1, but got 0 instead.",
        id="limit-0",
    ),
    pytest.param(
        "limit=-5",
        "limit",
        "integer_below_min_value",
        "Invalid 'limit': integer below minimum value. Expected a value >= 1, but got -5 instead.",
        id="limit-negative",
    ),
    pytest.param(
        "limit=abc",
        "limit",
        "invalid_type",
        "Invalid type for 'limit': expected an integer, but got a string instead.",
        id="limit-abc",
    ),
    pytest.param("limit=1.5", "limit", "invalid_type", None, id="limit-decimal"),
    pytest.param("limit=", "limit", "invalid_type", None, id="limit-empty"),
    pytest.param(
        "order=sideways",
        "order",
        "invalid_value",
        "Invalid value: 'sideways'. Supported values are: 'asc' and 'desc'.",
        id="order-sideways",
    ),
    pytest.param("order=ASC", "order", "invalid_value", None, id="order-uppercase"),
]


@pytest.mark.parametrize(("query", "param", "code", "message"), LIST_ERRORS)
async def test_list_parameters(
    http: httpx2.AsyncClient, thread_id: str, query: str, param: str, code: str, message: str | None
) -> None:
    for path in (f"/v1/threads/{thread_id}/messages", "/v1/assistants"):
        error = assert_error(await http.get(f"{path}?{query}", headers=BETA), 400, message)
        assert (error["param"], error["code"]) == (param, code)


async def test_list_parameters_through_the_sdk(client: openai.AsyncOpenAI, thread_id: str) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        await client.beta.threads.messages.list(thread_id, limit=101)
    assert error_of(exc)["code"] == "integer_above_max_value"
    with pytest.raises(openai.BadRequestError) as exc:
        await client.beta.assistants.list(order="sideways")  # type: ignore[arg-type]
    assert error_of(exc)["param"] == "order"
    assert len((await client.beta.threads.messages.list(thread_id, limit=100)).data) == 0
    assert len((await client.beta.threads.messages.list(thread_id, limit=1)).data) == 0


# --- OpenAI-Beta -------------------------------------------------------------------


async def test_v1_beta_header_is_served_in_v1_shapes(http: httpx2.AsyncClient) -> None:
    """Assistants v1 clients are served (tests/api/test_v1.py has the rest)."""
    for value in ("assistants=v1", "assistants = v1", "other=1, assistants=v1"):
        response = await http.post("/v1/assistants", headers={"OpenAI-Beta": value}, json={"model": "gpt-4o"})
        assert response.status_code == 200
        assert response.json()["file_ids"] == [] and "tool_resources" not in response.json()
    assert "tool_resources" in (await http.get("/v1/assistants", headers=BETA)).json()["data"][0]


# --- API keys ----------------------------------------------------------------------


async def test_missing_key_is_401(keyed_http: httpx2.AsyncClient) -> None:
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"api-key": ""}):
        response = await keyed_http.post("/v1/threads", headers={**BETA, **headers})
        assert response.json() == envelope(MISSING_KEY)
        assert_error(response, 401)
    # Authentication comes first, even for URLs that do not exist.
    assert_error(await keyed_http.get("/v1/nope", headers=BETA), 401, MISSING_KEY)


async def test_wrong_key_is_401_invalid_api_key(keyed_http: httpx2.AsyncClient) -> None:
    for headers in ({"Authorization": "Bearer sk-wrong-1234567890"}, {"api-key": "sk-wrong-1234567890"}):
        response = await keyed_http.get("/v1/assistants", headers={**BETA, **headers})
        error = assert_error(response, 401)
        assert error["code"] == "invalid_api_key"
        assert error["message"] == "Incorrect API key provided: sk-***7890."
        assert "sk-wrong-1234567890" not in response.text
    sdk = openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="sk-nope", http_client=keyed_http, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        await sdk.beta.threads.create()
    assert error_of(exc)["code"] == "invalid_api_key"


async def test_good_key_passes_as_bearer_or_azure_header(keyed_http: httpx2.AsyncClient) -> None:
    sdk = openai.AsyncOpenAI(base_url="http://testserver/v1", api_key=GOOD_KEY, http_client=keyed_http, max_retries=0)
    thread = await sdk.beta.threads.create(metadata={"via": "bearer"})
    assert (await sdk.beta.threads.retrieve(thread.id)).metadata == {"via": "bearer"}
    response = await keyed_http.get(f"/v1/threads/{thread.id}", headers={**BETA, "api-key": GOOD_KEY})
    assert response.status_code == 200 and response.json()["id"] == thread.id
    response = await keyed_http.get(f"/v1/threads/{thread.id}", headers={**BETA, "Authorization": "Bearer sk-other"})
    assert response.status_code == 200
    assert_error(await keyed_http.get("/v1/nope", headers={**BETA, "api-key": GOOD_KEY}), 404)


# --- Azure ----------------------------------------------------------------------------


async def test_azure_client(keyed_http: httpx2.AsyncClient) -> None:
    sent: list[httpx2.Request] = []

    async def record(request: httpx2.Request) -> None:
        sent.append(request)

    keyed_http.event_hooks["request"].append(record)
    for deployment in (None, "gpt-4o-deployment"):
        azure = openai.AsyncAzureOpenAI(
            azure_endpoint="http://testserver",
            api_version="2024-05-01-preview",
            api_key=GOOD_KEY,
            azure_deployment=deployment,
            http_client=keyed_http,
            max_retries=0,
        )
        assistant = await azure.beta.assistants.create(model="gpt-4o", name="Azure")
        assert (await azure.beta.assistants.retrieve(assistant.id)).name == "Azure"
        thread = await azure.beta.threads.create(messages=[{"role": "user", "content": "hi"}])
        assert (await azure.beta.threads.retrieve(thread.id)).id == thread.id
        await azure.beta.threads.messages.create(thread.id, role="user", content="again")
        listed = [m.content[0].text.value async for m in azure.beta.threads.messages.list(thread.id, order="asc")]  # type: ignore[union-attr]
        assert listed == ["hi", "again"]
        assert (await azure.beta.assistants.delete(assistant.id)).deleted is True
    assert len(sent) == 14
    for request in sent:
        # Assistants are not deployment endpoints: no /deployments/ even when one is set.
        assert request.url.path.startswith(("/openai/assistants", "/openai/threads")), request.url
        assert request.url.params["api-version"] == "2024-05-01-preview"
        assert request.headers["api-key"] == GOOD_KEY and "authorization" not in request.headers


async def test_azure_v1_surface(keyed_http: httpx2.AsyncClient) -> None:
    # Azure's v1 docs point the plain OpenAI client at <endpoint>/openai/v1/ with the key as api_key.
    sdk = openai.AsyncOpenAI(
        base_url="http://testserver/openai/v1/", api_key=GOOD_KEY, http_client=keyed_http, max_retries=0
    )
    thread = await sdk.beta.threads.create(metadata={"surface": "openai/v1"})
    message = await sdk.beta.threads.messages.create(thread.id, role="user", content="x")
    assert (await sdk.beta.threads.messages.retrieve(message.id, thread_id=thread.id)).id == message.id
    response = await keyed_http.get(
        f"/openai/v1/threads/{thread.id}?api-version=preview", headers={**BETA, "api-key": GOOD_KEY}
    )
    assert response.json()["metadata"] == {"surface": "openai/v1"}


# --- never 422, never 5xx -------------------------------------------------------------


async def test_bad_input_is_never_422_nor_5xx(http: httpx2.AsyncClient, thread_id: str) -> None:
    """FastAPI answers validation failures with 422 by default; OpenAI never does."""
    message_id = (
        await http.post(f"/v1/threads/{thread_id}/messages", headers=BETA, json={"role": "user", "content": "x"})
    ).json()["id"]
    thread = f"/v1/threads/{thread_id}"
    message = f"{thread}/messages/{message_id}"
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/v1/assistants", {}),
        ("POST", "/v1/assistants", {"json": {}}),
        ("POST", "/v1/assistants", {"json": {"model": None}}),
        ("POST", "/v1/assistants", {"json": {"model": "m", "temperature": "hot"}}),
        ("POST", "/v1/assistants", {"json": {"model": "m", "tools": [{}]}}),
        ("POST", "/v1/assistants", {"json": {"model": "m", "response_format": {"type": "json_schema"}}}),
        ("POST", "/v1/assistants", {"json": {"model": "m", "tool_resources": {"code_interpreter": []}}}),
        ("POST", "/v1/assistants/asst_x", {"json": {"model": 5}}),
        ("GET", "/v1/assistants?limit=abc&order=x&after=thread_x", {}),
        ("GET", "/v1/assistants?after=asst_x&before=", {}),
        ("POST", "/v1/threads", {"json": {"messages": [None]}}),
        ("POST", "/v1/threads", {"json": {"messages": [{"role": "user", "content": [None]}]}}),
        ("POST", "/v1/threads", {"json": {"tool_resources": {"file_search": {"vector_store_ids": "vs_x"}}}}),
        ("POST", "/v1/threads", {"json": {"metadata": {"a": None}}}),
        ("POST", "/v1/threads", {"content": b'{"messages": [{"role": "user", "content": "\\ud800"}]}'}),
        ("POST", thread, {"json": {"tool_resources": {"code_interpreter": {"file_ids": [1]}}}}),
        ("POST", thread, {"json": {"metadata": "x"}}),
        ("POST", f"{thread}/messages", {}),
        ("POST", f"{thread}/messages", {"json": None}),
        ("POST", f"{thread}/messages", {"json": {"role": None, "content": None}}),
        ("POST", f"{thread}/messages", {"json": {"role": "user", "content": [{"type": "image_url"}]}}),
        ("POST", f"{thread}/messages", {"json": {"role": "user", "content": "x", "attachments": [{"file_id": 1}]}}),
        ("GET", f"{thread}/messages?limit=1e3", {}),
        ("GET", f"{thread}/messages?after=msg_zz&run_id=", {}),
        ("POST", message, {"json": {"metadata": [1]}}),
        ("POST", message, {"content": b"null"}),
        ("POST", "/v1/threads/thread_x/runs", {"json": {}}),
        ("POST", "/v1/threads/runs", {"json": {"assistant_id": 5}}),
        ("GET", "/v1/files?limit=abc", {}),
        ("POST", "/v1/files", {"json": {"purpose": "assistants"}}),
    ]
    for method, path, kwargs in requests:
        headers = JSON if "content" in kwargs else BETA
        response = await http.request(method, path, headers=headers, **kwargs)
        assert 400 <= response.status_code < 500 and response.status_code != 422, (method, path, response.text)
        assert_error(response, response.status_code)


async def test_cursor_beyond_int64_is_400(http: httpx2.AsyncClient, thread_id: str) -> None:
    cursor = "msg_" + "z" * 24  # our id format, but a sequence no id we issue can have
    response = await http.get(f"/v1/threads/{thread_id}/messages?after={cursor}", headers=BETA)
    assert response.status_code == 400, response.text
