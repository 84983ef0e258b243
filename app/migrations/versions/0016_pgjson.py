"""pgjson: PostgreSQL's JSON columns are json (the text as written), not jsonb

jsonb keeps no object's key order (it sorts each object's keys shortest
first, then bytewise): on PostgreSQL a function tool's ``parameters`` and a
``response_format`` json_schema reached the provider with their
``properties`` reordered (structured outputs generate fields in schema
order), and a read gave back ``metadata``, ``tools``, ... reordered, unlike
OpenAI and SQLite (which stores the text). json stores the text as given:
the order and the exact numbers the server wrote (1e+23 stays 1e+23, where
jsonb's numeric printed the whole number).

Every JSON column becomes json:

* the API's columns (assistants, threads, messages, runs, run_steps,
  vector_stores, vector_store_files): what a user gave and reads back;
* ``run_events.data``: the log a stream is replayed from (a second reader,
  GET .../events), which must give the run objects as the live stream did
  (written from text as json: run_events._INSERT_POSTGRES_ROWS);
* ``model_requests.request``/``response``: the log of what the provider was
  sent and answered, kept as it was (cassettes key requests by their sorted
  keys, app/cassettes.py, so either type would do; json is cheaper to write);
* ``run_steps.internal``: the server's own notes (tool outputs by call id),
  read only by the runner; json for the same cost reason, nothing orders it.

None is only queried. What the database compares or looks inside:
``runs.metadata`` in the compare-and-set of a move carried alone
(run_state._carried), which casts both sides to jsonb (json has no ``=``;
jsonb's is order-blind, as before); ``vector_store_files.attributes`` in a
search's filter (app/retrieval/filters.py), read with json's ``->``/``->>``
and json_typeof. No index is on a JSON column.

Existing rows keep their content (already in jsonb's order): ``USING
col::json`` writes jsonb's text. The ALTERs rewrite each table under its
lock: a start-up that migrates waits on open transactions and on the
rewrite (run_events and model_requests are the large ones). Not for a
rolling upgrade: an older server still running on the migrated database
fails the end of a run moved alone (its ``runs.metadata = $n::JSONB`` has
no operator for json; its jsonb writes are cast to json on assignment), and
every server's prepared statements on the altered tables fail once.

The downgrade turns them back into jsonb. jsonb refuses a NUL character
(``\\u0000``), which json holds: the API refuses NUL in a request
(wire/common.py), but a provider's answer or a tool's output may carry one
(on jsonb such a run was retried until it expired; on json it completes, as
on SQLite). The downgrade writes each such NUL as U+FFFD, the replacement
character, so that it can finish. SQLite: nothing (its JSON columns are
text).

Revision ID: 0016_pgjson
Revises: 0015_pg_runs_status_index
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0016_pgjson"
down_revision = "0015_pg_runs_status_index"
branch_labels = None
depends_on = None

# Each table's JSON columns (app/orm.py's orm.JSONType).
COLUMNS = {
    "assistants": ("tools", "tool_resources", "metadata", "response_format"),
    "threads": ("tool_resources", "metadata"),
    "messages": ("content", "incomplete_details", "attachments", "metadata"),
    "runs": (
        "required_action",
        "last_error",
        "incomplete_details",
        "tools",
        "metadata",
        "usage",
        "truncation_strategy",
        "tool_choice",
        "response_format",
        "tool_resources",
    ),
    "run_steps": ("step_details", "last_error", "metadata", "usage", "internal"),
    "vector_stores": ("expires_after", "metadata"),
    "vector_store_files": ("last_error", "chunking_strategy", "attributes"),
    "model_requests": ("request", "response"),
    "run_events": ("data",),
}


# A NUL's escape in a column's JSON text: ``\u0000`` not itself escaped
# (preceded by an even number of backslashes, kept in group 1).
_NUL_ESCAPE = r"(?<!\\)((?:\\\\)*)\\u0000"
_REPLACEMENT_ESCAPE = r"\1\\ufffd"


def _retype(kind: str, using: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, columns in COLUMNS.items():
        # One ALTER TABLE per table: one rewrite of it for all its columns.
        changes = ", ".join(
            f'ALTER COLUMN "{name}" TYPE {kind} USING ' + using.format(column=f'"{name}"') for name in columns
        )
        op.execute(f'ALTER TABLE "{table}" {changes}')


def upgrade() -> None:
    _retype("json", "{column}::json")


def downgrade() -> None:
    _retype("jsonb", f"regexp_replace({{column}}::text, '{_NUL_ESCAPE}', '{_REPLACEMENT_ESCAPE}', 'g')::jsonb")
