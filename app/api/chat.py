"""/chat/completions, and Azure's /deployments/{deployment}/chat/completions
(the deployment names the model)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from app.api import sse
from app.api.deps import RuntimeDep
from app.services import chat
from app.wire.chat import ChatCompletionCreate

router = APIRouter(tags=["chat"])


async def _create(runtime: RuntimeDep, body: ChatCompletionCreate, deployment: str | None) -> Response:
    call = chat.request(runtime.llm, body, deployment)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse.data_stream(await chat.open_stream(runtime.llm, call, include_usage))
    return JSONResponse(await chat.complete(runtime.llm, call))


@router.post("/chat/completions")
async def create_chat_completion(body: ChatCompletionCreate, runtime: RuntimeDep) -> Response:
    return await _create(runtime, body, None)


@router.post("/deployments/{deployment}/chat/completions")
async def create_deployment_chat_completion(
    deployment: str, body: ChatCompletionCreate, runtime: RuntimeDep
) -> Response:
    return await _create(runtime, body, deployment)
