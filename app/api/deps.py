"""Dependencies shared by the routers."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Depends, Query, Request, Response
from pydantic import BaseModel
from pydantic_core import PydanticSerializationError
from starlette.types import Scope

from app import errors
from app.llm import whole_text
from app.runtime import Runtime
from app.services.pagination import PageParams
from app.services.projects import Project

# Where api/front.py (handlers.admit) records the project a request acts for.
_PROJECT = "assistants.project"


async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def set_project(scope: Scope, project: Project) -> None:
    scope[_PROJECT] = project


def project_of(scope: Scope) -> Project:
    """The project of the request's key (every API route acts for one)."""
    project = scope.get(_PROJECT)
    if not isinstance(project, Project):  # the gate admits no API request without one
        raise errors.APIError(401, "You didn't provide an API key.")
    return project


async def get_project(request: Request) -> Project:
    return project_of(request.scope)


ProjectDep = Annotated[Project, Depends(get_project)]


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
    body: str | bytes
    try:
        body = model.model_dump_json()
    except PydanticSerializationError:
        # A surrogate half UTF-8 cannot carry, in a row stored before model
        # text was mended on its way in (app/llm/unicode_text.py); the API
        # refuses one in a request. Answered mended, not as a 500; the row
        # is left as it is. Any other failure is raised again.
        body = whole_text.whole_json(model.model_dump(mode="json"))
    return Response(body, status_code=status_code, media_type="application/json")
