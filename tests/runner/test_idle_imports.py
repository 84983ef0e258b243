"""What a server imports for a database it does not use (idle RSS)."""

from pathlib import Path

from tests.runner.test_direct import _python_output


def test_a_sqlite_server_does_not_import_asyncpg(tmp_path: Path) -> None:
    """asyncpg (23 modules, about 3 MiB of idle RSS) is imported where a
    PostgreSQL BEGIN is written (app/asyncpg_begin.py), not at start-up:
    a SQLite server, started and through a transaction, never loads it."""
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from sqlalchemy import select, text\n"
        "import app.main\n"
        "from app import db\n"
        "from app.runtime import Runtime\n"
        "from app.settings import Settings\n"
        "async def main():\n"
        f"    runtime = await Runtime.start(Settings(data_dir=Path({str(tmp_path / 'data')!r})))\n"
        "    try:\n"
        "        async with runtime.transaction() as session:\n"
        "            await db.run_now(session, select(text('1')), {})\n"
        "    finally:\n"
        "        await runtime.close()\n"
        "asyncio.run(main())\n"
        "assert 'asyncpg' not in sys.modules, 'asyncpg was imported'\n"
        "print('ok')\n"
    )
    assert _python_output(script).strip() == "ok"
