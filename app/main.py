"""create_app(settings): the ASGI application."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress

from fastapi import FastAPI

import app as package
from app.api import API_PREFIXES, admin, build_router, docs, front, handlers, health, hot_routes
from app.console import pages
from app.observability.http import RequestObserver
from app.runtime import Runtime
from app.settings import Settings
from app.worker import Worker

log = logging.getLogger("app")


def _lifespan(
    settings: Settings, *, with_worker: bool, serves_api: bool = True
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await Runtime.start(settings)
        app.state.runtime = runtime
        if serves_api and await runtime.keys.is_open():
            log.warning(
                "no API keys configured: the server accepts every request "
                "(set ASSISTANTS_API_KEYS or create keys with `assistants-server keys create --project NAME`)"
            )
        worker_task = None
        if with_worker:
            worker = Worker(runtime)
            runtime.attach_worker(worker)
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

    return lifespan


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    # No trailing-slash redirects: OpenAI answers those paths "Invalid URL".
    # /docs is served by app/api/docs.py (local assets), ReDoc not at all.
    app = FastAPI(
        title="Assistants API v2 compatible server",
        version=package.__version__,
        lifespan=_lifespan(settings, with_worker=settings.embedded_worker),
        redirect_slashes=False,
        docs_url=None,
        redoc_url=None,
        openapi_url=docs.OPENAPI_PATH,
    )
    # Two layers before FastAPI's: the observer outermost (request id, access
    # log, HTTP metrics), then the front (request id header, key gate, URL
    # check, body limits, v1 translation; api/front.py).
    handlers.install(app)
    app.add_middleware(
        front.ApiFront,
        public_paths=health.PATHS | docs.PUBLIC_PATHS,
        max_body_bytes=settings.max_json_body_bytes,
        body_timeout_seconds=settings.http_body_timeout_seconds,
    )
    app.add_middleware(RequestObserver)
    app.include_router(health.router)
    docs.install(app, API_PREFIXES[0], settings.api_keys)
    router = build_router()
    # The OpenAPI document lists the first prefix only.
    for prefix in API_PREFIXES:
        app.include_router(router, prefix=prefix, include_in_schema=prefix == API_PREFIXES[0])
    if settings.admin_api:
        app.include_router(admin.router)
    app.include_router(pages.router)
    pages.mount_static(app)
    hot_routes.install(app)
    return app


def create_worker_app(settings: Settings) -> FastAPI:
    """A standalone worker (``worker --metrics-port``): the run executor with
    only /metrics, /healthz and /readyz over HTTP, no API."""
    app = FastAPI(
        title="assistants-server worker",
        version=package.__version__,
        lifespan=_lifespan(settings, with_worker=True, serves_api=False),
        redirect_slashes=False,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_middleware(RequestObserver)
    app.include_router(health.router)
    return app
