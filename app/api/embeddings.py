"""/embeddings, and Azure's /deployments/{deployment}/embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from app.api.deps import RuntimeDep
from app.services import embeddings
from app.wire.embeddings import EmbeddingCreate

router = APIRouter(tags=["embeddings"])


@router.post("/embeddings")
async def create_embedding(body: EmbeddingCreate, runtime: RuntimeDep) -> Response:
    return JSONResponse(await embeddings.create(runtime.settings, runtime.llm, body))


@router.post("/deployments/{deployment}/embeddings")
async def create_deployment_embedding(deployment: str, body: EmbeddingCreate, runtime: RuntimeDep) -> Response:
    return JSONResponse(await embeddings.create(runtime.settings, runtime.llm, body, deployment))
