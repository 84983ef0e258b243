"""File objects (openai.types.FileObject)."""

from __future__ import annotations

from typing import ClassVar, Literal

from app.wire.common import OmittingWireModel

UPLOAD_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
FilePurpose = Literal[
    "assistants",
    "assistants_output",
    "batch",
    "batch_output",
    "fine-tune",
    "fine-tune-results",
    "vision",
    "user_data",
    "evals",
]
FileStatus = Literal["uploaded", "processed", "error"]


class FileObject(OmittingWireModel):
    omit_when_none: ClassVar[frozenset[str]] = frozenset({"expires_at", "status_details"})

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None = None
    filename: str
    purpose: FilePurpose
    # Deprecated by OpenAI but required by the Python SDK's type; always "processed" here.
    status: FileStatus = "processed"
    status_details: str | None = None
