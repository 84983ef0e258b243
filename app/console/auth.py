"""Console sign-in: an API key in an HttpOnly, SameSite=Strict cookie.

The API takes keys in headers, which a browser's page loads do not send;
the console checks the cookie against the same configured keys instead.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

COOKIE = "assistants_console_key"


class SignInRequired(Exception):
    """Raised by the dependency; answered with a redirect to the sign-in page."""


def key_is_valid(request: Request, key: str) -> bool:
    keys: list[str] = request.app.state.runtime.settings.api_keys
    return not keys or any(hmac.compare_digest(key.encode(), valid.encode()) for valid in keys)


async def require_key(request: Request) -> None:
    keys: list[str] = request.app.state.runtime.settings.api_keys
    if keys and not key_is_valid(request, request.cookies.get(COOKIE, "")):
        raise SignInRequired


SignedIn = Annotated[None, Depends(require_key)]
