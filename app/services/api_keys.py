"""API keys: made, listed and revoked by the CLI (``assistants-server keys``),
resolved to their project on every request by :class:`KeyRing`.

Only a key's SHA-256 is stored (a key is 288 random bits, so a plain hash is
enough: nothing to brute-force), with its first characters to tell keys apart
in listings. The keys of ASSISTANTS_API_KEYS belong to the default project.
A server with neither kind of key is open: every request acts for the
default project. A revoked key still counts as "a key exists", so revoking
the last key never opens a server.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app import db, ids, orm
from app.services import projects
from app.services.projects import Project

KEY_PREFIX = "sk-proj-"
KEY_ID = "key_"
# What listings show of a key: "sk-proj-" and 8 random characters.
VISIBLE_CHARS = len(KEY_PREFIX) + 8
# Resolved keys kept at most (unknown keys included, so that a flood of
# wrong keys costs one query per key and TTL, and bounded memory).
CACHE_ENTRIES = 10_000


class KeyNotFound(LookupError):
    """No key matches, or more than one does (the message says which)."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class KeyInfo:
    id: str
    prefix: str
    project: str
    created_at: int
    revoked_at: int | None


async def create(session: AsyncSession, project_name: str) -> tuple[str, KeyInfo]:
    """A new key of the project called ``project_name`` (created if new):
    the key itself (shown once, never stored) and its listing."""
    project = await projects.ensure(session, project_name)
    key = KEY_PREFIX + secrets.token_urlsafe(36)
    seq = ids.next_seq()
    row = orm.ApiKey(
        id=ids.new_id(KEY_ID, seq),
        project_id=project.id,
        key_hash=hash_key(key),
        prefix=key[:VISIBLE_CHARS],
        created_at=ids.seconds(seq),
        revoked_at=None,
    )
    session.add(row)
    await session.flush()
    return key, KeyInfo(row.id, row.prefix, project.name, row.created_at, None)


async def list_(session: AsyncSession) -> list[KeyInfo]:
    query = (
        select(orm.ApiKey, orm.Project.name)
        .join(orm.Project, orm.Project.id == orm.ApiKey.project_id)
        .order_by(orm.ApiKey.created_at, orm.ApiKey.id)
    )
    return [
        KeyInfo(row.id, row.prefix, name, row.created_at, row.revoked_at)
        for row, name in (await session.execute(query)).all()
    ]


async def revoke(session: AsyncSession, prefix_or_id: str) -> KeyInfo:
    """Revoke the one key named by its id, the whole key, or the start of its
    visible prefix (longer than "sk-proj-"); revoking twice changes nothing."""
    given = prefix_or_id.strip()
    listing = select(orm.ApiKey, orm.Project.name).join(orm.Project, orm.Project.id == orm.ApiKey.project_id)
    found = (
        await session.execute(listing.where(or_(orm.ApiKey.id == given, orm.ApiKey.key_hash == hash_key(given))))
    ).all()
    if not found and len(KEY_PREFIX) < len(given) <= VISIBLE_CHARS:
        found = (await session.execute(listing.where(orm.ApiKey.prefix.startswith(given, autoescape=True)))).all()
    if not found:
        raise KeyNotFound(f"no key has the id or prefix {given!r} (see `keys list`)")
    if len(found) > 1:
        raise KeyNotFound(f"{len(found)} keys start with {given!r}: give more of the prefix, or the id")
    row, name = found[0]
    if row.revoked_at is None:
        row.revoked_at = ids.now()
    return KeyInfo(row.id, row.prefix, name, row.created_at, row.revoked_at)


@dataclass
class _Cached:
    project: Project | None
    until: float


class KeyRing:
    """Key -> project for the request gate and the console's sign-in.

    Cheap on the hot path: the configured keys are a set lookup; a stored
    key's project (or its absence) is read once and kept ``ttl`` seconds, so
    a revoked key stops working at most ``ttl`` seconds later in every
    process (ASSISTANTS_KEY_CACHE_SECONDS). The reads take no SQLite write
    lock (app.db.read_rows).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        configured: Sequence[str],
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._configured = frozenset(hash_key(key) for key in configured)
        self._ttl = ttl
        self._clock = clock
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._open: tuple[bool, float] | None = None  # (open, until)

    async def project_of(self, key: str) -> Project | None:
        """The key's project; None for a key that is unknown or revoked."""
        digest = hash_key(key)
        if digest in self._configured:
            return projects.DEFAULT
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None and cached.until > now:
            return cached.project
        project = await self._read(digest)
        self._cache[digest] = _Cached(project, now + self._ttl)
        self._cache.move_to_end(digest)
        while len(self._cache) > CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return project

    async def is_open(self) -> bool:
        """No key configured and none ever created: every request is let in."""
        if self._configured:
            return False
        now = self._clock()
        if self._open is None or self._open[1] <= now:
            rows = await db.read_rows(self._engine, "SELECT 1 FROM api_keys LIMIT 1", {})
            self._open = (not rows, now + self._ttl)
        return self._open[0]

    async def _read(self, digest: str) -> Project | None:
        rows = await db.read_rows(
            self._engine,
            "SELECT p.id, p.name FROM api_keys k JOIN projects p ON p.id = k.project_id "
            "WHERE k.key_hash = :digest AND k.revoked_at IS NULL",
            {"digest": digest},
        )
        return Project(str(rows[0][0]), str(rows[0][1])) if rows else None
