"""Thin routers, one per resource, combined into one router mounted under
/v1 (OpenAI), /openai and /openai/v1 (Azure)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api import assistants, files, messages, threads


def build_router() -> APIRouter:
    router = APIRouter()
    for module in (assistants, threads, messages, files):
        router.include_router(module.router)
    return router
