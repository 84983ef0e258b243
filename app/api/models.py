"""/models"""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from app.api.deps import RuntimeDep
from app.services import models

router = APIRouter(tags=["models"])


@router.get("/models")
async def list_models(runtime: RuntimeDep) -> Response:
    return JSONResponse(models.list_(runtime.llm))


@router.get("/models/{model:path}")
async def retrieve_model(model: str, runtime: RuntimeDep) -> Response:
    # :path, as model names may hold slashes (ft:..., org/model).
    return JSONResponse(models.retrieve(runtime.llm, model))
