"""The checkpoint registry: one SQLite row per checkpoint, the source of truth for
list, inspect and restore by name.

SQLite calls block, so every statement runs on the registry's own single worker
thread (one connection, used only there); the event loop never waits on disk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import enum
import json
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from kybernate.errors import AlreadyExists, InvalidArgument, NotFound

T = TypeVar("T")


class CheckpointState(enum.StrEnum):
    STAGING = "staging"
    COMMITTED = "committed"
    FAILED = "failed"


class Tier(enum.StrEnum):
    LOCAL = "local"
    REMOTE = "remote"


@dataclasses.dataclass(frozen=True)
class CheckpointRow:
    id: str
    name: str
    state: CheckpointState
    tier: Tier
    dirty: bool
    size_bytes: int
    file_count: int
    checksums: dict[str, str]
    container_id: str
    namespace: str
    image: str
    created_at: datetime
    error: str


_SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,
    state        TEXT NOT NULL CHECK (state IN ('staging', 'committed', 'failed')),
    tier         TEXT NOT NULL CHECK (tier IN ('local', 'remote')),
    dirty        INTEGER NOT NULL DEFAULT 0,
    size_bytes   INTEGER NOT NULL DEFAULT 0,
    file_count   INTEGER NOT NULL DEFAULT 0,
    checksums    TEXT NOT NULL DEFAULT '{}',
    container_id TEXT NOT NULL DEFAULT '',
    namespace    TEXT NOT NULL DEFAULT '',
    image        TEXT NOT NULL DEFAULT '',
    created_at   TEXT NOT NULL,
    error        TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS checkpoints_dirty ON checkpoints (dirty) WHERE dirty = 1;
"""

_COLUMNS = ("id", "name", "state", "tier", "dirty", "size_bytes", "file_count", "checksums",
            "container_id", "namespace", "image", "created_at", "error")


def _row(values: tuple[Any, ...]) -> CheckpointRow:
    record = dict(zip(_COLUMNS, values, strict=True))
    return CheckpointRow(
        id=record["id"], name=record["name"], state=CheckpointState(record["state"]),
        tier=Tier(record["tier"]), dirty=bool(record["dirty"]), size_bytes=record["size_bytes"],
        file_count=record["file_count"], checksums=json.loads(record["checksums"]),
        container_id=record["container_id"], namespace=record["namespace"], image=record["image"],
        created_at=datetime.fromisoformat(record["created_at"]), error=record["error"],
    )


class Registry:
    """Async facade over the SQLite database; `open()` before use, `close()` after."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry")
        await self._run(self._connect)

    def _connect(self) -> None:
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed checkpoint must not vanish from the registry on power loss.
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=5000")
        db.executescript(_SCHEMA)
        self._db = db

    async def close(self) -> None:
        if self._executor is None:
            return
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)
        self._executor = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            raise RuntimeError("registry is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("registry is not open")
        return self._db

    # -- writes ---------------------------------------------------------------

    async def add_staging(self, id: str, name: str, *, container_id: str, namespace: str,
                          image: str, created_at: datetime | None = None) -> None:
        created = (created_at or datetime.now(UTC)).isoformat()

        def insert() -> None:
            try:
                self._conn().execute(
                    "INSERT INTO checkpoints (id, name, state, tier, created_at, container_id, namespace, image)"
                    " VALUES (?, ?, 'staging', 'local', ?, ?, ?, ?)",
                    (id, name, created, container_id, namespace, image),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"checkpoint name {name!r} (or id {id}) is already in the registry") from None

        await self._run(insert)

    async def mark_committed(self, id: str, *, size_bytes: int, file_count: int,
                             checksums: dict[str, str], dirty: bool) -> None:
        await self._update(id, "state = 'committed', tier = 'local', dirty = ?, size_bytes = ?,"
                           " file_count = ?, checksums = ?, error = ''",
                           int(dirty), size_bytes, file_count, json.dumps(checksums, sort_keys=True))

    async def add_committed(self, row: CheckpointRow) -> None:
        """Record a checkpoint found elsewhere (a remote download) as committed."""
        def insert() -> None:
            self._conn().execute(
                f"INSERT OR REPLACE INTO checkpoints ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                (row.id, row.name, row.state.value, row.tier.value, int(row.dirty), row.size_bytes,
                 row.file_count, json.dumps(row.checksums, sort_keys=True), row.container_id,
                 row.namespace, row.image, row.created_at.isoformat(), row.error),
            )
        await self._run(insert)

    async def mark_failed(self, id: str, error: str) -> None:
        await self._update(id, "state = 'failed', dirty = 0, error = ?", error)

    async def mark_uploaded(self, id: str) -> None:
        await self._update(id, "tier = 'remote', dirty = 0")

    async def _update(self, id: str, assignments: str, *params: Any) -> None:
        def update() -> None:
            cursor = self._conn().execute(f"UPDATE checkpoints SET {assignments} WHERE id = ?", (*params, id))
            if cursor.rowcount == 0:
                raise NotFound(f"checkpoint {id} is not in the registry")
        await self._run(update)

    # -- reads ----------------------------------------------------------------

    async def get(self, id_or_name: str) -> CheckpointRow:
        if not id_or_name:
            raise InvalidArgument("a checkpoint id or name is required")

        def select() -> CheckpointRow:
            cur = self._conn().execute(
                f"SELECT {', '.join(_COLUMNS)} FROM checkpoints WHERE id = ? OR name = ?"
                " ORDER BY id = ? DESC LIMIT 1", (id_or_name, id_or_name, id_or_name))
            values = cur.fetchone()
            if values is None:
                raise NotFound(f"checkpoint {id_or_name!r} is not in the registry")
            return _row(values)

        return await self._run(select)

    async def all(self, state: CheckpointState | None = None) -> list[CheckpointRow]:
        def select() -> list[CheckpointRow]:
            query = f"SELECT {', '.join(_COLUMNS)} FROM checkpoints"
            params: tuple[Any, ...] = ()
            if state is not None:
                query += " WHERE state = ?"
                params = (state.value,)
            return [_row(v) for v in self._conn().execute(query + " ORDER BY created_at, id", params)]
        return await self._run(select)

    async def dirty(self) -> list[CheckpointRow]:
        def select() -> list[CheckpointRow]:
            cur = self._conn().execute(
                f"SELECT {', '.join(_COLUMNS)} FROM checkpoints WHERE dirty = 1 AND state = 'committed'"
                " ORDER BY created_at")
            return [_row(v) for v in cur]
        return await self._run(select)

    async def dirty_count(self) -> int:
        def count() -> int:
            return int(self._conn().execute(
                "SELECT COUNT(*) FROM checkpoints WHERE dirty = 1 AND state = 'committed'").fetchone()[0])
        return await self._run(count)
