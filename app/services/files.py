"""Files: the upload rules, retrieve, list, delete and content lookup.

The bytes live in Storage keyed by file id; the row is the file's existence.
An upload reaches create() only once its body has been read completely, so a
row is never inserted for a partial or rejected upload.

Expired files (``expires_at`` passed) behave as deleted: hidden from lists and
404 everywhere. Their bytes are removed when a request touches them; their
rows when a list runs (a 404 rolls its transaction back, a list commits).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from sqlalchemy import ColumnElement, or_
from sqlalchemy import delete as sql_delete
from sqlalchemy.ext.asyncio import AsyncSession

from app import errors, ids, orm
from app.services import pagination, projects, vector_store_files
from app.services.common import require_id
from app.services.projects import Project
from app.storage import Storage
from app.wire.common import Deleted, ListPage
from app.wire.files import UPLOAD_PURPOSES, FileObject, FilePurpose, FileStatus

# Form field names as the SDKs send them (nested objects use brackets) and the
# dotted names OpenAI reports in errors.
ANCHOR_FIELD = "expires_after[anchor]"
SECONDS_FIELD = "expires_after[seconds]"
_PARAM_OF = {ANCHOR_FIELD: "expires_after.anchor", SECONDS_FIELD: "expires_after.seconds"}
MIN_EXPIRES_SECONDS = 3600
MAX_EXPIRES_SECONDS = 30 * 24 * 3600
# OAS createFile: "files with purpose=batch expire after 30 days" unless told otherwise.
DEFAULT_EXPIRES_SECONDS = {"batch": MAX_EXPIRES_SECONDS}


class StagedFile(Protocol):
    """An uploaded file part, already complete on disk at ``path``."""

    path: Path
    filename: str
    size: int


@dataclass(frozen=True)
class NewFile:
    purpose: str
    expires_after_seconds: int | None


def _missing(param: str) -> errors.APIError:
    return errors.invalid(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")


def _one_of(param: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        quoted = [f"'{item}'" for item in allowed]
        listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + f", and {quoted[-1]}"
        raise errors.invalid(
            f"Invalid value: '{value}'. Supported values are: {listed}.", param=param, code="invalid_value"
        )
    return value


def _expires_seconds(value: str) -> int:
    param = _PARAM_OF[SECONDS_FIELD]
    try:
        seconds = int(value.strip())
    except ValueError:
        raise errors.invalid(
            f"Invalid type for '{param}': expected an integer, but got a string instead.",
            param=param,
            code="invalid_type",
        ) from None
    if not MIN_EXPIRES_SECONDS <= seconds <= MAX_EXPIRES_SECONDS:
        side, op, bound = (
            ("below", ">=", MIN_EXPIRES_SECONDS)
            if seconds < MIN_EXPIRES_SECONDS
            else ("above", "<=", MAX_EXPIRES_SECONDS)
        )
        limit = "minimum" if side == "below" else "maximum"
        raise errors.invalid(
            f"Invalid '{param}': integer {side} {limit} value. Expected a value {op} {bound}, "
            f"but got {seconds} instead.",
            param=param,
            code=f"integer_{side}_{'min' if side == 'below' else 'max'}_value",
        )
    return seconds


def check_field(name: str, value: str) -> None:
    """Judge one text field of the upload form the moment it arrives, so a bad
    ``purpose`` sent before the file (go-openai's order) is refused before the
    file's bytes are written."""
    if name == "purpose":
        _one_of("purpose", value, UPLOAD_PURPOSES)
    elif name == ANCHOR_FIELD:
        _one_of(_PARAM_OF[name], value, ("created_at",))
    elif name == SECONDS_FIELD:
        _expires_seconds(value)
    else:
        raise errors.invalid(f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")


def new_file(fields: Mapping[str, str], staged: StagedFile | None) -> NewFile:
    """The complete form's parameters; the file part is checked first, as the spec lists it."""
    if staged is None:
        raise _missing("file")
    if "purpose" not in fields:
        raise _missing("purpose")
    for name, value in fields.items():
        check_field(name, value)
    for given, needed in ((ANCHOR_FIELD, SECONDS_FIELD), (SECONDS_FIELD, ANCHOR_FIELD)):
        if given in fields and needed not in fields:
            raise _missing(_PARAM_OF[needed])
    seconds = fields.get(SECONDS_FIELD)
    purpose = fields["purpose"]
    return NewFile(
        purpose=purpose,
        expires_after_seconds=(
            _expires_seconds(seconds) if seconds is not None else DEFAULT_EXPIRES_SECONDS.get(purpose)
        ),
    )


async def create(
    session: AsyncSession, storage: Storage, project: Project, fields: Mapping[str, str], staged: StagedFile | None
) -> orm.File:
    """Insert the row and move the staged bytes under the new id.

    The row is flushed first, so the bytes are committed only for a row the
    database accepted. If the final COMMIT still fails, the bytes stay behind
    under an id no row names: garbage, never a file without content.
    """
    params = new_file(fields, staged)
    assert staged is not None  # new_file() refused a form without a file
    seq = ids.next_seq()
    created_at = ids.seconds(seq)
    seconds = params.expires_after_seconds
    row = orm.File(
        id=ids.new_id(ids.FILE, seq),
        project_id=project.id,
        seq=seq,
        created_at=created_at,
        bytes=staged.size,
        filename=staged.filename,
        purpose=params.purpose,
        expires_at=created_at + seconds if seconds is not None else None,
        status="processed",
    )
    session.add(row)
    await session.flush()
    storage.commit(staged.path, row.id)
    return row


async def create_output(
    session: AsyncSession, storage: Storage, project_id: str, filename: str, data: bytes
) -> orm.File:
    """A file a tool made (code_interpreter's charts and files) in a run of
    project ``project_id``: purpose ``assistants_output``, bytes written aside
    and renamed in after the row is accepted, as in create()."""
    temp = storage.temp_path()
    temp.write_bytes(data)
    seq = ids.next_seq()
    row = orm.File(
        id=ids.new_id(ids.FILE, seq),
        project_id=project_id,
        seq=seq,
        created_at=ids.seconds(seq),
        bytes=len(data),
        filename=filename,
        purpose="assistants_output",
        status="processed",
    )
    session.add(row)
    try:
        await session.flush()
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    storage.commit(temp, row.id)
    return row


def _expired(row: orm.File) -> bool:
    return row.expires_at is not None and row.expires_at <= ids.now()


def live() -> ColumnElement[bool]:
    """SQL condition for files that have not expired (for queries joining files)."""
    return or_(orm.File.expires_at.is_(None), orm.File.expires_at > ids.now())


async def get(session: AsyncSession, storage: Storage, project: Project, file_id: str) -> orm.File:
    require_id("file_id", file_id, ids.FILE)
    row = await projects.lookup(session, project, orm.File, file_id, lambda: errors.file_not_found(file_id))
    if _expired(row):
        # Safe before any commit: an expired row is never served again.
        storage.delete(file_id)
        raise errors.file_not_found(file_id)
    return row


async def content_path(
    session: AsyncSession, storage: Storage, project: Project, file_id: str
) -> tuple[orm.File, Path]:
    """The file and where its bytes are; 404 if either is gone."""
    row = await get(session, storage, project, file_id)
    if not storage.exists(file_id):
        raise errors.file_not_found(file_id)
    return row, storage.path(file_id)


async def delete(session: AsyncSession, storage: Storage, project: Project, file_id: str) -> Deleted:
    await get(session, storage, project, file_id)
    await vector_store_files.forget_file(session, file_id)  # it leaves every vector store
    await session.execute(sql_delete(orm.File).where(orm.File.id == file_id))
    await session.flush()
    storage.delete(file_id)
    return Deleted(id=file_id, object="file")


async def _purge_expired(session: AsyncSession, storage: Storage) -> None:
    expired = (orm.File.expires_at.is_not(None)) & (orm.File.expires_at <= ids.now())
    gone = (await session.scalars(sql_delete(orm.File).where(expired).returning(orm.File.id))).all()
    for file_id in gone:
        storage.delete(file_id)


async def list_(
    session: AsyncSession, storage: Storage, project: Project, params: pagination.PageParams, purpose: str | None
) -> ListPage[Any]:
    await _purge_expired(session, storage)  # every project's: housekeeping of rows no one can see
    query = projects.owned(project, orm.File).where(live())
    if purpose is not None:
        query = query.where(orm.File.purpose == purpose)
    rows, has_more = await pagination.fetch_page(session, query, orm.File.seq, params, ids.FILE)
    return pagination.page([to_wire(row) for row in rows], has_more)


def to_wire(row: orm.File) -> FileObject:
    return FileObject(
        id=row.id,
        bytes=row.bytes,
        created_at=row.created_at,
        expires_at=row.expires_at,
        filename=row.filename,
        purpose=cast(FilePurpose, row.purpose),
        status=cast(FileStatus, row.status),
        status_details=row.status_details,
    )
