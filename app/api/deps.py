"""Dependencies shared by the routers."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Depends, Query, Request, Response
from pydantic import BaseModel

from app.runtime import Runtime
from app.services.pagination import PageParams


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def page_params(
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    after: str | None = None,
    before: str | None = None,
) -> PageParams:
    return PageParams(limit=limit, order=order, after=after, before=before)


PageDep = Annotated[PageParams, Depends(page_params)]


def respond(model: BaseModel, status_code: int = 200) -> Response:
    """Serialize a wire model once, straight to bytes (no re-validation)."""
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")
