"""Pieces shared by several resources: bases, metadata, tools, formats, pages."""

from __future__ import annotations

import re
from contextvars import ContextVar
from typing import Annotated, Any, ClassVar, Generic, Literal, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ModelWrapValidatorHandler,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

# Placeholder that validators put in their messages; the error translator
# (app.errors) replaces it with the parameter path, e.g. ``thread.metadata``.
PARAM = "\x00param\x00"


class RequestModel(BaseModel):
    """A request body: unknown parameters are an error, as on OpenAI.

    Every string must also be storable and echoable: PostgreSQL text refuses
    NUL characters (its json columns keep one escaped, but ``->>`` would
    not, and a downgrade to jsonb writes it as U+FFFD: migration
    0016_pgjson), and JSON's lone surrogate escapes cannot be
    encoded as UTF-8, so both would otherwise surface as 5xx errors on one
    engine and not the other. Nesting is capped below the serializer's limit.

    Types are strict, as OpenAI's are: ``"5"`` is not an integer, ``0`` and
    ``"true"`` are not booleans, ``true`` is not a number (an integer still
    is one).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="wrap")
    @classmethod
    def _storable(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        # The outermost request model checks its whole body, before its
        # fields are validated; the request models nested in it find their
        # parts checked already (_BODY_CHECKED) and do not walk them again
        # (two or three walks of the same strings in a thread-and-run body).
        # The common case, nothing wrong, takes the quick check; only a body
        # that fails it is walked again for the path and reason of its first
        # problem.
        if not isinstance(data, dict) or _BODY_CHECKED.get():
            return handler(data)
        if not _all_storable(data, 1):
            problem = _first_unstorable(data)
            if problem is not None:
                path, reason = problem
                raise custom_error("invalid_value", f"Invalid '{PARAM}': {reason}", param_suffix=path)
        checked = _BODY_CHECKED.set(True)
        try:
            return handler(data)
        finally:
            _BODY_CHECKED.reset(checked)


class WireModel(BaseModel):
    """A response object: every field sent, None as null."""

    model_config = ConfigDict(extra="forbid")
    serializes_omissions: ClassVar[bool] = False  # OmittingWireModel's serializer

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        # /openapi.json shows response objects as they were when every one
        # had the wrapping serializer (OmittingWireModel): as any value.
        # Their fields' schemas would be new there; the wire notes and the
        # SDKs are the reference for them.
        return {} if handler.mode == "serialization" else handler(schema)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # omit_when_none works only under OmittingWireModel's serializer: on a
        # plain WireModel it would send nulls without a word.
        super().__init_subclass__(**kwargs)
        if "omit_when_none" in cls.__dict__ and not cls.serializes_omissions:
            raise TypeError(f"{cls.__name__} omits fields: derive it from OmittingWireModel")


class OmittingWireModel(WireModel):
    """A response object whose fields named in ``omit_when_none`` are left
    out instead of sent as null (the spec marks them optional, not
    nullable). A class of its own (issue 17): the wrapping serializer is a
    Python call on every dump, more than half of a run's dump, so the
    models that omit nothing do without it."""

    serializes_omissions: ClassVar[bool] = True
    omit_when_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_nones(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if self.omit_when_none and isinstance(data, dict):
            for key in self.omit_when_none:
                if data.get(key, 0) is None:
                    del data[key]
        return data


def custom_error(code: str, message: str, param_suffix: str = "") -> PydanticCustomError:
    """An error whose message names the parameter through PARAM.

    The reported parameter (and PARAM in the message) is the location the
    error was raised at, extended by param_suffix: ``metadata`` + ``.key``
    -> ``metadata.key``, or the body root + ``messages[0].content``.
    """
    # Braces would be read as format fields by pydantic; PARAM has none.
    template = message.replace("{", "{{").replace("}", "}}")
    return PydanticCustomError(code, template, {"param_suffix": param_suffix})


# --- storable text -------------------------------------------------------------

MAX_NESTING = 100  # pydantic's serializer gives up at about 250 levels
# Set while a request model's fields are validated, its whole body checked
# (RequestModel._storable): what is nested in it is part of that body.
_BODY_CHECKED: ContextVar[bool] = ContextVar("request_body_checked", default=False)
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored alike on both databases, worded after
    ``string`` (``Invalid 'x': string contains ...``), or None."""
    match = _UNSTORABLE.search(text)
    if match is None:
        return None
    if match.group() == "\x00":
        return "string contains a null character (\\u0000), which is not supported."
    return "string contains an unpaired surrogate, which is not valid Unicode."


def _all_storable(container: dict[str, Any] | list[Any], depth: int) -> bool:
    """Whether _first_unstorable finds nothing, without building paths (a
    third of its time). Recursion stops at MAX_NESTING levels."""
    if depth > MAX_NESTING:
        return False
    values = container.values() if isinstance(container, dict) else container
    if isinstance(container, dict) and any(_UNSTORABLE.search(str(key)) for key in container):
        return False
    for value in values:
        if isinstance(value, str):
            if _UNSTORABLE.search(value):
                return False
        elif isinstance(value, (dict, list)) and not _all_storable(value, depth + 1):
            return False
    return True


def _first_unstorable(data: dict[str, Any]) -> tuple[str, str] | None:
    """The path and reason of the first string that cannot be stored, or of
    nesting deeper than MAX_NESTING (iterative: deep input must not recurse)."""
    stack: list[tuple[Any, str, int]] = [(data, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            reason = text_problem(value)
            if reason is not None:
                return path, reason
            continue
        if isinstance(value, dict):
            items: list[tuple[Any, str]] = []
            for key, item in value.items():
                name = str(key)
                reason = text_problem(name)
                if reason is not None:
                    return f"{path}.{_UNSTORABLE.sub(chr(0xFFFD), name)}", reason.replace("string", "key", 1)
                items.append((item, f"{path}.{name}"))
        elif isinstance(value, list):
            items = [(item, f"{path}[{index}]") for index, item in enumerate(value)]
        else:
            continue
        if depth > MAX_NESTING:
            return path, f"nesting too deep. Expected at most {MAX_NESTING} levels of nested objects and arrays."
        stack.extend((item, item_path, depth + 1) for item, item_path in reversed(items))
    return None


# --- field limits ----------------------------------------------------------------

# OpenAI's limit on message text and instructions (characters).
MAX_TEXT = 256_000
# The largest integer an INTEGER column holds on both databases (PostgreSQL's
# is 32-bit; SQLite cannot even bind one beyond 64 bits): a request's integer
# stored in one is bounded by it, so a larger one is a 400, not a 500.
MAX_STORED_INT = 2**31 - 1
# A model id; OpenAI's are far shorter, and an empty one is refused there too.
ModelName = Annotated[str, Field(min_length=1, max_length=256)]


# --- metadata ---------------------------------------------------------------

MAX_METADATA_KEYS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


def check_key_values(value: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's limits on metadata and on vector store file attributes: at most
    16 keys of at most 64 characters, string values of at most 512."""
    if len(value) > MAX_METADATA_KEYS:
        raise custom_error(
            "object_above_max_properties",
            f"Invalid '{PARAM}': too many properties. Expected an object with at most "
            f"{MAX_METADATA_KEYS} properties, but got an object with {len(value)} properties instead.",
        )
    for key, item in value.items():
        if len(key) > MAX_METADATA_KEY:
            raise custom_error(
                "string_above_max_length",
                f"Invalid '{PARAM}': key too long. Expected a key with maximum length "
                f"{MAX_METADATA_KEY}, but got a key with length {len(key)} instead.",
            )
        if isinstance(item, str) and len(item) > MAX_METADATA_VALUE:
            raise custom_error(
                "string_above_max_length",
                f"Invalid '{PARAM}': string too long. Expected a string with maximum length "
                f"{MAX_METADATA_VALUE}, but got a string with length {len(item)} instead.",
                param_suffix=f".{key}",
            )
    return value


Metadata = Annotated[dict[str, str], AfterValidator(check_key_values)]


# --- tools --------------------------------------------------------------------

_FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def _check_function_name(name: str) -> str:
    if not _FUNCTION_NAME.match(name):
        raise custom_error(
            "invalid_value",
            f"Invalid '{PARAM}': string does not match pattern. Expected a string that matches "
            f"the pattern '^[a-zA-Z0-9_-]+$' with at most 64 characters.",
        )
    return name


class RankingOptions(RequestModel):
    ranker: Literal["auto", "default_2024_08_21"] = "auto"
    score_threshold: float = Field(ge=0, le=1)


class FileSearchOptions(RequestModel):
    max_num_results: int | None = Field(default=None, ge=1, le=50)
    ranking_options: RankingOptions | None = None


class FunctionDefinition(RequestModel):
    name: Annotated[str, AfterValidator(_check_function_name)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class CodeInterpreterTool(RequestModel):
    type: Literal["code_interpreter"]


class FileSearchTool(RequestModel):
    type: Literal["file_search"]
    file_search: FileSearchOptions | None = None


class FunctionTool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


Tool = Annotated[CodeInterpreterTool | FileSearchTool | FunctionTool, Field(discriminator="type")]


def tool_to_wire(tool: CodeInterpreterTool | FileSearchTool | FunctionTool) -> dict[str, Any]:
    """The tool as OpenAI echoes it back, defaults filled in."""
    if isinstance(tool, FunctionTool):
        function = tool.function.model_dump(exclude_none=True)
        function.setdefault("strict", False)
        return {"type": "function", "function": function}
    if isinstance(tool, FileSearchTool):
        options = tool.file_search or FileSearchOptions()
        ranking = options.ranking_options or RankingOptions(score_threshold=0.0)
        file_search: dict[str, Any] = {"ranking_options": ranking.model_dump()}
        if options.max_num_results is not None:
            file_search["max_num_results"] = options.max_num_results
        return {"type": "file_search", "file_search": file_search}
    return {"type": "code_interpreter"}


# --- response_format ---------------------------------------------------------


class ResponseFormatText(RequestModel):
    type: Literal["text"]


class ResponseFormatJsonObject(RequestModel):
    type: Literal["json_object"]


class JsonSchemaFormat(RequestModel):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormatJsonSchema(RequestModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = (
    Literal["auto"]
    | Annotated[
        ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema,
        Field(discriminator="type"),
    ]
)


def response_format_to_wire(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value or "auto"
    return value.model_dump(by_alias=True, exclude_none=True)


# --- tool_resources ------------------------------------------------------------


class CodeInterpreterResources(RequestModel):
    file_ids: list[str] = Field(default_factory=list, max_length=20)


class ChunkingStatic(RequestModel):
    max_chunk_size_tokens: int = Field(ge=100, le=4096)
    chunk_overlap_tokens: int = Field(ge=0)


class AutoChunking(RequestModel):
    type: Literal["auto"]


class StaticChunking(RequestModel):
    type: Literal["static"]
    static: ChunkingStatic


ChunkingStrategy = Annotated[AutoChunking | StaticChunking, Field(discriminator="type")]


class VectorStoreHelper(RequestModel):
    file_ids: list[str] = Field(default_factory=list, max_length=10000)
    chunking_strategy: ChunkingStrategy | None = None
    metadata: Metadata | None = None


class FileSearchResourcesUpdate(RequestModel):
    vector_store_ids: list[str] | None = Field(default=None, max_length=1)


class FileSearchResources(FileSearchResourcesUpdate):
    vector_stores: list[VectorStoreHelper] | None = Field(default=None, max_length=1)


class ToolResourcesUpdate(RequestModel):
    """tool_resources on modify: no ``vector_stores`` helper (OAS ModifyThreadRequest)."""

    code_interpreter: CodeInterpreterResources | None = None
    file_search: FileSearchResourcesUpdate | None = None


class ToolResources(ToolResourcesUpdate):
    """tool_resources on create: file_search may build a store from file ids."""

    file_search: FileSearchResources | None = None


# --- lists ---------------------------------------------------------------------

T = TypeVar("T")


class ListPage(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    first_id: str | None
    last_id: str | None
    has_more: bool


class Deleted(WireModel):
    id: str
    object: str
    deleted: bool = True
