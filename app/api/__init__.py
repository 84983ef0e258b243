"""Thin routers, one per resource, combined into one router mounted under
/v1 (OpenAI), /openai and /openai/v1 (Azure)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api import (
    assistants,
    chat,
    embeddings,
    files,
    messages,
    models,
    run_events,
    runs,
    threads,
    vector_stores,
)

# OpenAI's own paths, Azure's (AzureOpenAI puts /openai before every path) and
# Azure's newer v1 surface.
API_PREFIXES = ("/v1", "/openai", "/openai/v1")


def build_router() -> APIRouter:
    router = APIRouter()
    # runs before threads: POST /threads/runs must not match POST /threads/{thread_id}.
    for module in (assistants, runs, run_events, threads, messages, files, vector_stores, chat, embeddings, models):
        router.include_router(module.router)
    return router
