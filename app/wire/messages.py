"""Message objects and request bodies (openai.types.beta.threads.Message).

Note the asymmetry: a request text part is ``{"type": "text", "text": "..."}``,
a response text part is ``{"type": "text", "text": {"value", "annotations"}}``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from app.wire.common import MAX_TEXT, PARAM, CodeInterpreterTool, Metadata, RequestModel, WireModel, custom_error

ImageDetail = Literal["auto", "low", "high"]


class TextPart(RequestModel):
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT)


class ImageFileRef(RequestModel):
    file_id: str
    detail: ImageDetail | None = None


class ImageFilePart(RequestModel):
    type: Literal["image_file"]
    image_file: ImageFileRef


class ImageUrlRef(RequestModel):
    url: str
    detail: ImageDetail | None = None

    @field_validator("url")
    @classmethod
    def _external(cls, url: str) -> str:
        # The spec's "external URL of the image" (format: uri): OpenAI
        # refused anything but a web address here, a base64 data URL too
        # (that is Chat Completions' form, not the Assistants API's), so a
        # test suite run against this server fails where OpenAI would.
        if not is_external_url(url):
            raise custom_error(
                "invalid_value", f"Invalid '{PARAM}'. Expected a valid URL, but got a value with an invalid format."
            )
        return url


def is_external_url(url: str) -> bool:
    """An absolute http(s) URL naming a host, with no whitespace in it."""
    if any(character.isspace() for character in url):
        return False
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # a malformed [IPv6] host
        return False
    return parts.scheme.lower() in ("http", "https") and bool(host)


class ImageUrlPart(RequestModel):
    type: Literal["image_url"]
    image_url: ImageUrlRef


ContentPart = Annotated[TextPart | ImageFilePart | ImageUrlPart, Field(discriminator="type")]


class FileSearchTypeOnly(RequestModel):
    type: Literal["file_search"]


AttachmentTool = Annotated[CodeInterpreterTool | FileSearchTypeOnly, Field(discriminator="type")]


class Attachment(RequestModel):
    file_id: str
    tools: list[AttachmentTool] = Field(default_factory=list)


class MessageCreate(RequestModel):
    role: Literal["user", "assistant"]
    content: (
        Annotated[str, Field(min_length=1, max_length=MAX_TEXT)] | Annotated[list[ContentPart], Field(min_length=1)]
    )
    attachments: list[Attachment] | None = None
    metadata: Metadata | None = None


class MessageUpdate(RequestModel):
    metadata: Metadata | None = None


class Message(WireModel):
    id: str
    object: Literal["thread.message"] = "thread.message"
    created_at: int
    thread_id: str
    status: Literal["in_progress", "incomplete", "completed"]
    incomplete_details: dict[str, Any] | None
    completed_at: int | None
    incomplete_at: int | None
    role: Literal["user", "assistant"]
    content: list[dict[str, Any]]
    assistant_id: str | None
    run_id: str | None
    attachments: list[dict[str, Any]] | None
    metadata: dict[str, str]
