"""Models (``GET /models``, issue 12): what the routing file names, and the
built-in offline model. Wildcard entries are not listed (they are patterns,
not names) but ``GET /models/{model}`` answers for any name they route."""

from __future__ import annotations

from app import llm
from app.services.chat import model_not_found
from app.wire import models as wire

OWNER = "assistants-server"


def _model(name: str) -> wire.Model:
    return {"id": name, "object": "model", "created": 0, "owned_by": OWNER}


def list_(models: llm.LLM) -> wire.ModelList:
    return {"object": "list", "data": [_model(name) for name in models.model_names()]}


def retrieve(models: llm.LLM, name: str) -> wire.Model:
    if not models.is_configured(name):
        raise model_not_found(name)
    return _model(name)
