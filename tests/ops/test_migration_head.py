"""The server skips alembic when the schema is current (app/db.py): that
relies on db.head_revision() naming the same head as alembic itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory

from app import db


def test_head_revision_is_alembics_head() -> None:
    config = Config()
    config.set_main_option("script_location", str(db.MIGRATIONS_DIR))
    assert db.head_revision() == ScriptDirectory.from_config(config).get_current_head()


_PROGRAM = """
import asyncio, sys
from app import db

async def main(url):
    engine = db.create_engine(url)
    try:
        await db.migrate(engine)
    finally:
        await engine.dispose()
    print("alembic" in sys.modules)

asyncio.run(main(sys.argv[1]))
"""


def _migrate_in_a_process(url: str) -> bool:
    """Whether a fresh process had to import alembic to migrate ``url``."""
    done = subprocess.run([sys.executable, "-c", _PROGRAM, url], capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip().splitlines()[-1] == "True"


def test_a_current_database_is_not_migrated_again(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'assistants.db'}"
    assert _migrate_in_a_process(url) is True  # a new database: alembic creates the schema
    assert _migrate_in_a_process(url) is False  # now current: nothing to import or run
