"""/admin: test support (reset, scripted offline answers, the model-request log).

An extension of ours, not OpenAI's API: it exists only when the server runs
with ``ASSISTANTS_ADMIN_API=true`` (``serve --ephemeral`` turns it on), and
sits behind the same API keys as everything else. The pytest plugin
(app/testing) drives it; other languages can call it with any HTTP client.
"""

from __future__ import annotations

import shutil
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response
from fastapi.responses import JSONResponse

from app import errors, scripting
from app.api.deps import RuntimeDep
from app.services import admin, model_requests

router = APIRouter(prefix="/admin", tags=["admin (test support)"])


@router.post("/reset")
async def reset(runtime: RuntimeDep) -> Response:
    """Forget every object, file and scripted rule: a clean server for the next test."""
    runtime.llm.script.clear()
    if runtime.llm.cassettes is not None:
        runtime.llm.cassettes.misses.clear()
    async with runtime.transaction() as session:
        await admin.reset(session)
    files = runtime.storage.root
    for entry in files.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return JSONResponse({"object": "admin.reset", "reset": True})


@router.post("/offline/rules")
async def add_rule(runtime: RuntimeDep, body: Annotated[Any, Body()] = None) -> Response:
    try:
        rule = runtime.llm.script.add(body)
    except scripting.ScriptError as exc:
        raise errors.invalid(str(exc)) from None
    return JSONResponse(scripting.describe(rule, 0))


@router.get("/offline/rules")
async def list_rules(runtime: RuntimeDep) -> Response:
    book = runtime.llm.script
    data = [scripting.describe(rule, book.used(rule.id)) for rule in book.rules()]
    return JSONResponse({"object": "list", "data": data})


@router.delete("/offline/rules")
async def clear_rules(runtime: RuntimeDep) -> Response:
    runtime.llm.script.clear()
    return JSONResponse({"object": "list", "data": []})


@router.delete("/offline/rules/{rule_id}")
async def delete_rule(rule_id: str, runtime: RuntimeDep) -> Response:
    if not runtime.llm.script.remove(rule_id):
        raise errors.not_found("offline rule", rule_id)
    return JSONResponse({"id": rule_id, "object": "offline.rule.deleted", "deleted": True})


@router.post("/llm/misses")
async def take_replay_misses(runtime: RuntimeDep) -> Response:
    """Requests that found no recording since the last call (replay mode), then forgets them."""
    book = runtime.llm.cassettes
    misses = list(book.misses) if book is not None else []
    if book is not None:
        book.misses.clear()
    data = [{"object": "llm.replay_miss", "model": miss.model, "message": miss.message} for miss in misses]
    return JSONResponse({"object": "list", "data": data})


@router.get("/model_requests")
async def list_model_requests(
    runtime: RuntimeDep,
    run_id: Annotated[str | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    """What the model was sent and answered, oldest first: one run's, or the newest ``limit``."""
    async with runtime.transaction() as session:
        data = await model_requests.list_for_run(session, run_id, limit)
    return JSONResponse({"object": "list", "data": data})
