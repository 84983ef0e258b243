"""app/services/core_rows.record: a new row built without the mapped
constructor's attribute events is the same record as one built with it.
update_row's ``unless_status``: a write made only while the row has another status."""

from __future__ import annotations

import pytest

from app import orm
from app.runtime import Runtime
from app.services import core_rows, runs
from tests.runner.test_worker import _make_runs

pytestmark = pytest.mark.timeout(10)

_RUN = {
    "id": "run_record",
    "seq": 7,
    "created_at": 1,
    "thread_id": "thread_record",
    "assistant_id": "asst_record",
    "status": "queued",
    "expires_at": 601,
    "model": "offline",
    "instructions": "",
    "tools": [],
    "metadata_": {},
    "temperature": 1.0,
    "top_p": 1.0,
    "truncation_strategy": {"type": "auto", "last_messages": None},
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "response_format": "auto",
    "lease_owner": None,
}


def test_a_record_is_what_the_constructor_builds() -> None:
    built, recorded = orm.Run(**_RUN), core_rows.record(orm.Run, **_RUN)
    assert type(recorded) is orm.Run
    assert core_rows.values(recorded) == core_rows.values(built)  # what insert_row sends: only the values set
    assert runs.to_wire(recorded) == runs.to_wire(built)  # unset attributes read as None
    recorded.tool_resources = {"code_interpreter": {"file_ids": []}}  # a later change goes through the ORM
    assert core_rows.values(recorded)["tool_resources"] == {"code_interpreter": {"file_ids": []}}


def test_a_name_that_is_no_attribute_is_refused_as_by_the_constructor() -> None:
    with pytest.raises(TypeError, match="not_a_column"):
        core_rows.record(orm.Run, **_RUN, not_a_column=1)
    with pytest.raises(TypeError):
        orm.Run(**_RUN, not_a_column=1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("write_behind", [True, False], ids=["held-back", "executed"])
async def test_an_update_unless_a_status_is_made_only_while_the_row_has_another(
    runtime: Runtime, write_behind: bool
) -> None:
    (run_id,) = await _make_runs(runtime, 1)  # queued
    for unless_status, metadata in (("in_progress", {"is": "written"}), ("queued", {"not": "written"})):
        changed = core_rows.record(orm.Run, id=run_id, metadata_=metadata)
        async with runtime.transaction() as session:
            await core_rows.update_row(
                session, changed, ("metadata_",), write_behind=write_behind, unless_status=unless_status
            )
    async with runtime.transaction() as session:
        run = await session.get(orm.Run, run_id)
    assert run is not None and run.metadata_ == {"is": "written"}
