"""/docs works without the internet, /openapi.json lists each operation once,
and with API keys configured it says how to authorize."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncIterator

import httpx2
import pytest

from app.main import create_app
from app.settings import Settings

LOCAL_REFERENCE = re.compile(r"""(?:src|href)=["']([^"']+)["']""")


@pytest.fixture
async def keyed(settings: Settings) -> AsyncIterator[httpx2.AsyncClient]:
    application = create_app(settings.model_copy(update={"api_keys": ["sk-only"]}))
    async with (
        application.router.lifespan_context(application),
        httpx2.AsyncClient(transport=httpx2.ASGITransport(app=application), base_url="http://testserver") as client,
    ):
        yield client


async def test_docs_page_and_assets_come_from_the_server(plain: httpx2.AsyncClient) -> None:
    page = await plain.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    # Nothing fetched from elsewhere: no CDN, no online validator badge.
    assert "http://" not in page.text and "https://" not in page.text
    assert '"validatorUrl": null' in page.text
    references = LOCAL_REFERENCE.findall(page.text)
    assert references, page.text
    for reference in references:
        assert reference.startswith("/docs/assets/"), reference
        asset = await plain.get(reference)
        assert asset.status_code == 200, reference
        assert len(asset.content) > 500
    script = await plain.get("/docs/assets/swagger-ui-bundle.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert "/openapi.json" in page.text
    assert (await plain.get("/docs/assets/index.html")).status_code == 404
    assert (await plain.get("/docs/assets/..%2Fswagger-ui.css")).status_code == 404
    assert (await plain.get("/redoc")).status_code == 404


async def test_openapi_lists_each_operation_once(plain: httpx2.AsyncClient) -> None:
    schema = (await plain.get("/openapi.json")).json()
    paths = schema["paths"]
    assert "/v1/threads/{thread_id}/runs/{run_id}" in paths
    assert not [path for path in paths if path.startswith("/openai")]
    operation_ids = Counter(
        operation["operationId"] for operations in paths.values() for operation in operations.values()
    )
    assert [name for name, count in operation_ids.items() if count > 1] == []
    assert {"/healthz", "/readyz"} <= set(paths)
    assert "/metrics" not in paths and "/docs" not in paths
    # Open server: nothing to authorize with.
    assert "securitySchemes" not in schema.get("components", {})


async def test_with_keys_the_docs_say_how_to_authorize(keyed: httpx2.AsyncClient) -> None:
    # The docs, their assets and the schema open without a key; the API does not.
    assert (await keyed.get("/docs")).status_code == 200
    assert (await keyed.get("/docs/assets/swagger-ui.css")).status_code == 200
    schema_response = await keyed.get("/openapi.json")
    assert schema_response.status_code == 200
    schema = schema_response.json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer", "description": schemes["bearer"]["description"]}
    assert schemes["api-key"]["in"] == "header" and schemes["api-key"]["name"] == "api-key"
    run = schema["paths"]["/v1/threads/{thread_id}/runs/{run_id}"]["get"]
    assert run["security"] == [{"bearer": []}, {"api-key": []}]
    assert "security" not in schema["paths"]["/readyz"]["get"]
    assert (await keyed.get("/v1/assistants")).status_code == 401
