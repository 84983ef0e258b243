"""/docs (Swagger UI) served entirely by this server, so it works offline
and behind firewalls: the UI's files come from the swagger-ui-bundle-v2
package, not a CDN. /openapi.json lists each operation once (under /v1; the
Azure aliases /openai and /openai/v1 are left out of it) and, when API keys
are configured, declares how to send one so that "Authorize" works."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import swagger_ui_bundle  # type: ignore[import-untyped]  # (no py.typed; one attribute used)
from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse

DOCS_PATH = "/docs"
OPENAPI_PATH = "/openapi.json"
ASSETS_PATH = "/docs/assets"
# The only files the page needs; nothing else of the package is served.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}
PUBLIC_PATHS = frozenset({DOCS_PATH, OPENAPI_PATH, *(f"{ASSETS_PATH}/{name}" for name in ASSETS)})
BEARER_SCHEME = "bearer"
AZURE_KEY_SCHEME = "api-key"

router = APIRouter(include_in_schema=False)


@router.get(DOCS_PATH)
async def swagger_ui() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=OPENAPI_PATH,
        title="Assistants API v2 compatible server",
        swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_PATH}/favicon-32x32.png",
        # Swagger UI's default sends the schema to an online validator for a badge.
        swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": True},
    )


@router.get(ASSETS_PATH + "/{name}")
async def swagger_asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(404)
    return FileResponse(Path(swagger_ui_bundle.swagger_ui_path) / name, media_type=media_type)


def install(app: FastAPI, api_prefix: str, api_keys: list[str]) -> None:
    """Serve /docs and an /openapi.json that says how to authorize."""
    app.include_router(router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            if api_keys:
                _declare_keys(schema, api_prefix)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _declare_keys(schema: dict[str, Any], api_prefix: str) -> None:
    schema.setdefault("components", {})["securitySchemes"] = {
        BEARER_SCHEME: {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key (ASSISTANTS_API_KEYS, or made with `assistants-server keys create`), "
            "as the OpenAI SDK sends it (Authorization: Bearer <key>)",
        },
        AZURE_KEY_SCHEME: {
            "type": "apiKey",
            "in": "header",
            "name": "api-key",
            "description": "The same key as AzureOpenAI sends it",
        },
    }
    requirement: list[dict[str, list[str]]] = [{BEARER_SCHEME: []}, {AZURE_KEY_SCHEME: []}]
    for path, operations in schema.get("paths", {}).items():
        if path.startswith(api_prefix + "/"):
            for operation in operations.values():
                operation["security"] = requirement
