"""Small rules shared by the resource services."""

from __future__ import annotations

from typing import Any

from app import errors


def require_id(param: str, value: str, prefix: str) -> str:
    """OpenAI checks a path id's prefix before looking it up (400, not 404)."""
    if not value.startswith(prefix):
        raise errors.invalid_id(param, value, prefix)
    return value


def metadata_or_empty(value: dict[str, Any] | None) -> dict[str, str]:
    return dict(value or {})
