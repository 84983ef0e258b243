"""Models on the wire (``GET /models``, ``GET /models/{model}``)."""

from __future__ import annotations

from typing import Literal, TypedDict


class Model(TypedDict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(TypedDict):
    object: Literal["list"]
    data: list[Model]
