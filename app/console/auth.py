"""Console sign-in: an API key in an HttpOnly, SameSite=Strict cookie.

The API takes keys in headers, which a browser's page loads do not send;
the console checks the cookie with the same key ring as the API instead, and
shows the key's project only (an open server: the default project).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.services import api_keys, projects
from app.services.projects import Project

COOKIE = "assistants_console_key"


class SignInRequired(Exception):
    """Raised by the dependency; answered with a redirect to the sign-in page."""


async def project_of_key(request: Request, key: str) -> Project | None:
    """The key's project; None if the key lets nobody in."""
    keys: api_keys.KeyRing = request.app.state.runtime.keys
    if await keys.is_open():
        return projects.DEFAULT
    return await keys.project_of(key) if key else None


async def require_key(request: Request) -> Project:
    project = await project_of_key(request, request.cookies.get(COOKIE, ""))
    if project is None:
        raise SignInRequired
    request.state.console_project = project  # named in the page header (base.html)
    return project


SignedIn = Annotated[Project, Depends(require_key)]
