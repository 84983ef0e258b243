"""``assistants-server keys create | list | revoke``: the API keys of projects.

``create`` prints the new key alone on stdout (once: only its hash is
stored), so ``KEY=$(assistants-server keys create --project team-a)`` works;
what it did goes to stderr. A running server notices a new or revoked key
within ASSISTANTS_KEY_CACHE_SECONDS.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from app import preflight
from app.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

# The database side (app.db, app.services) is imported by main() only: the CLI
# module imports this one for add_parser(), and ``serve --workers N``'s
# supervisor must stay small (issue 17).

T = TypeVar("T")


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    keys = commands.add_parser(
        "keys",
        help="create, list and revoke API keys (each belongs to a project)",
        description="API keys of projects: a key sees only its project's assistants, threads, files and "
        "vector stores. Keys in ASSISTANTS_API_KEYS belong to the project 'default'.",
    )
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = actions.add_parser("create", parents=[common], help="make a key of a project (created if new)")
    create.add_argument("--project", required=True, metavar="NAME", help="the project's name, e.g. team-a")
    actions.add_parser("list", parents=[common], help="list keys: id, prefix, project, created, revoked")
    revoke = actions.add_parser("revoke", parents=[common], help="revoke a key (effective within the key cache time)")
    revoke.add_argument("key", metavar="PREFIX_OR_ID", help="the key's id, its prefix as listed, or the key itself")


def _when(value: int | None) -> str:
    if value is None:
        return "-"
    return datetime.datetime.fromtimestamp(value, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


async def _in_transaction(settings: Settings, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    from app import db

    engine = db.create_engine(settings.resolved_database_url())
    try:
        async with db.create_sessionmaker(engine)() as session, session.begin():
            return await work(session)
    finally:
        await engine.dispose()


def main(settings: Settings, args: argparse.Namespace) -> int:
    from app.services import api_keys

    preflight.prepare_database(settings)  # the tables exist (and the default project)
    if args.keys_command == "create":
        name = args.project.strip()
        if not name:
            print("assistants-server: --project needs a name", file=sys.stderr)
            return 2
        key, info = asyncio.run(_in_transaction(settings, lambda session: api_keys.create(session, name)))
        print(key)
        print(
            f"created key {info.id} ({info.prefix}...) of project {info.project!r}; "
            "it is shown only this once: store it now",
            file=sys.stderr,
        )
        return 0
    if args.keys_command == "list":
        rows = asyncio.run(_in_transaction(settings, api_keys.list_))
        print(f"{'ID':<30} {'PREFIX':<20} {'PROJECT':<20} {'CREATED (UTC)':<20} REVOKED (UTC)")
        for row in rows:
            print(
                f"{row.id:<30} {row.prefix + '...':<20} {row.project:<20} "
                f"{_when(row.created_at):<20} {_when(row.revoked_at)}"
            )
        return 0
    try:
        info = asyncio.run(_in_transaction(settings, lambda session: api_keys.revoke(session, args.key)))
    except api_keys.KeyNotFound as exc:
        print(f"assistants-server: {exc}", file=sys.stderr)
        return 1
    print(f"revoked key {info.id} ({info.prefix}...) of project {info.project!r}", file=sys.stderr)
    return 0
