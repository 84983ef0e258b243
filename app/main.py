"""create_app(settings): the ASGI application."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI

from app.api import admin, build_router, handlers, limits, v1compat
from app.console import pages
from app.runtime import Runtime
from app.settings import Settings
from app.worker import Worker

log = logging.getLogger("app")

# OpenAI's own paths, Azure's (AzureOpenAI puts /openai before every path) and
# Azure's newer v1 surface.
API_PREFIXES = ("/v1", "/openai", "/openai/v1")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await Runtime.start(settings)
        app.state.runtime = runtime
        if not settings.api_keys:
            log.warning("no API keys configured: the server accepts every request (set ASSISTANTS_API_KEYS)")
        worker_task = None
        if settings.embedded_worker:
            worker = Worker(runtime)
            runtime.wake_worker = worker.wake
            worker_task = asyncio.create_task(worker.run_forever(), name="worker")
        try:
            yield
        finally:
            if worker_task is not None:
                # Drain in-flight runs, release the rest for the next start.
                worker.request_stop()
                with suppress(asyncio.CancelledError):
                    await worker_task
            await runtime.close()

    # No trailing-slash redirects: OpenAI answers those paths "Invalid URL".
    app = FastAPI(
        title="Assistants API v2 compatible server", version="0.1.0", lifespan=lifespan, redirect_slashes=False
    )
    # Middleware added first runs innermost: the key gate, then the body
    # limit, then the translation of v1 requests (which reads bodies).
    app.add_middleware(v1compat.AssistantsV1)
    app.add_middleware(
        limits.BodyLimit, max_bytes=settings.max_json_body_bytes, timeout_seconds=settings.http_body_timeout_seconds
    )
    handlers.install(app, settings.api_keys)
    router = build_router()
    for prefix in API_PREFIXES:
        app.include_router(router, prefix=prefix)
    if settings.admin_api:
        app.include_router(admin.router)
    app.include_router(pages.router)
    pages.mount_static(app)
    return app
