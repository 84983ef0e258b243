"""Vector stores, their files and file batches, search (openai.types.vector_stores)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import AfterValidator, Field

from app.wire.common import ChunkingStrategy, Metadata, OmittingWireModel, RequestModel, WireModel, check_key_values

# bool first: pydantic's smart union keeps JSON true/false as booleans.
Attributes = Annotated[dict[str, bool | float | str], AfterValidator(check_key_values)]


class ExpiresAfter(RequestModel):
    anchor: Literal["last_active_at"]
    days: int = Field(ge=1, le=365)


# --- requests -------------------------------------------------------------------


class VectorStoreCreate(RequestModel):
    file_ids: list[str] | None = Field(default=None, max_length=500)
    name: str | None = None
    description: str | None = None
    expires_after: ExpiresAfter | None = None
    chunking_strategy: ChunkingStrategy | None = None
    metadata: Metadata | None = None


class VectorStoreUpdate(RequestModel):
    name: str | None = None
    expires_after: ExpiresAfter | None = None
    metadata: Metadata | None = None


class VectorStoreFileCreate(RequestModel):
    file_id: str
    chunking_strategy: ChunkingStrategy | None = None
    attributes: Attributes | None = None


class VectorStoreFileUpdate(RequestModel):
    attributes: Attributes | None


class BatchFile(RequestModel):
    file_id: str
    chunking_strategy: ChunkingStrategy | None = None
    attributes: Attributes | None = None


class FileBatchCreate(RequestModel):
    file_ids: list[str] | None = Field(default=None, min_length=1, max_length=2000)
    files: list[BatchFile] | None = Field(default=None, min_length=1, max_length=2000)
    chunking_strategy: ChunkingStrategy | None = None
    attributes: Attributes | None = None


class ComparisonFilter(RequestModel):
    type: Literal["eq", "ne", "gt", "gte", "lt", "lte", "in", "nin"]
    key: str
    value: bool | float | str | list[bool | float | str]


class CompoundFilter(RequestModel):
    type: Literal["and", "or"]
    filters: list[Union[ComparisonFilter, CompoundFilter]]  # noqa: UP007 (a forward reference)


Filter = Union[ComparisonFilter, CompoundFilter]  # noqa: UP007


class SearchRankingOptions(RequestModel):
    ranker: Literal["none", "auto", "default-2024-11-15"] = "auto"
    score_threshold: float = Field(default=0.0, ge=0, le=1)


class SearchRequest(RequestModel):
    query: str | list[str]
    rewrite_query: bool = False
    max_num_results: int = Field(default=10, ge=1, le=50)
    filters: Filter | None = None
    ranking_options: SearchRankingOptions | None = None


# --- responses ------------------------------------------------------------------


class FileCounts(WireModel):
    in_progress: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    total: int = 0


class VectorStore(OmittingWireModel):
    omit_when_none: ClassVar[frozenset[str]] = frozenset({"expires_after"})

    id: str
    object: Literal["vector_store"] = "vector_store"
    created_at: int
    name: str
    usage_bytes: int
    file_counts: FileCounts
    status: Literal["expired", "in_progress", "completed"]
    expires_after: dict[str, Any] | None = None
    expires_at: int | None
    last_active_at: int | None
    metadata: dict[str, str]


class VectorStoreFile(WireModel):
    id: str
    object: Literal["vector_store.file"] = "vector_store.file"
    usage_bytes: int
    created_at: int
    vector_store_id: str
    status: Literal["in_progress", "completed", "cancelled", "failed"]
    last_error: dict[str, Any] | None
    chunking_strategy: dict[str, Any]
    attributes: dict[str, Any] | None


class FileBatch(WireModel):
    id: str
    object: Literal["vector_store.files_batch"] = "vector_store.files_batch"
    created_at: int
    vector_store_id: str
    status: Literal["in_progress", "completed", "cancelled", "failed"]
    file_counts: FileCounts


class TextContent(WireModel):
    type: Literal["text"] = "text"
    text: str


class FileContentPage(WireModel):
    object: Literal["vector_store.file_content.page"] = "vector_store.file_content.page"
    data: list[TextContent]
    has_more: bool = False
    next_page: str | None = None


class SearchResult(WireModel):
    file_id: str
    filename: str
    score: float
    attributes: dict[str, Any] | None
    content: list[TextContent]


class SearchResultsPage(WireModel):
    object: Literal["vector_store.search_results.page"] = "vector_store.search_results.page"
    search_query: list[str]
    data: list[SearchResult]
    has_more: bool = False
    next_page: str | None = None
