"""row_reads.values: what reading each attribute through the ORM gives, on a
record, a loaded row, an expired one and a Row."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from app import ids, orm
from app.services import core_rows, row_reads, runs
from app.wire.runs import Run

SEQ = 1_795_000_000_123_456_789


def _through_the_orm(row: Any) -> dict[str, Any]:
    return {name: getattr(row, attribute) for name, attribute in runs._RUN_FIELDS}


def _record() -> orm.Run:
    return core_rows.record(
        orm.Run,
        id=ids.new_id(ids.RUN, SEQ),
        seq=SEQ,
        created_at=ids.seconds(SEQ),
        thread_id="thread_1",
        assistant_id="asst_1",
        status="queued",
        expires_at=ids.seconds(SEQ) + 600,
        model="offline",
        instructions="",
        tools=[{"type": "code_interpreter"}],
        metadata_={"k": "v"},
        temperature=1,
        top_p=1.0,
        truncation_strategy={"type": "auto", "last_messages": None},
        tool_choice="auto",
        parallel_tool_calls=True,
        response_format="auto",
    )


@pytest.fixture
def session() -> Iterator[Session]:
    engine = create_engine("sqlite://")
    orm.Run.__table__.create(engine)
    with Session(engine, expire_on_commit=False) as session:
        yield session
    engine.dispose()


def test_a_record_reads_its_values_and_none_for_the_rest() -> None:
    record = _record()
    found = row_reads.values(record, runs._RUN_FIELDS)
    assert found == _through_the_orm(record)
    assert found["required_action"] is None and found["metadata"] == {"k": "v"}
    assert runs.to_wire(record) == Run(**_through_the_orm(record))


def test_a_loaded_row_an_expired_attribute_and_a_row(session: Session) -> None:
    record = _record()
    session.add(record)
    session.commit()
    session.expunge_all()
    loaded = session.scalars(select(orm.Run)).one()
    assert row_reads.values(loaded, runs._RUN_FIELDS) == _through_the_orm(loaded)
    # Changed behind the object's back, then expired: read again, not None.
    session.execute(orm.Run.__table__.update().values(status="in_progress", started_at=5))
    session.expire(loaded, ["status", "started_at"])
    found = row_reads.values(loaded, runs._RUN_FIELDS)
    assert (found["status"], found["started_at"]) == ("in_progress", 5)
    row = session.execute(select(*(getattr(orm.Run, a) for _, a in runs._RUN_FIELDS))).one()
    assert row_reads.values(row, runs._RUN_FIELDS) == found
