"""The checkpoint registry: one SQLite row per checkpoint, the source of truth for
list, inspect and restore by name, and the shares that let other namespaces restore
a checkpoint.

Names are unique within a containerd namespace among checkpoints that did not fail:
a failed attempt does not reserve its name, and two namespaces never compete for
one. Ids are unique everywhere (`naming.new_checkpoint_id`).

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
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from kybernate.agent import naming
from kybernate.agent.access import Party, Share
from kybernate.errors import AlreadyExists, InvalidArgument, NotFound

T = TypeVar("T")

SCHEMA_VERSION = 2


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
    pod_namespace: str = ""

    @property
    def qualified_name(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def owner(self) -> Party:
        return Party(self.namespace, self.pod_namespace)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], *, tier: Tier, dirty: bool) -> CheckpointRow:
        """The row of a committed checkpoint known only by its (verified) metadata."""
        files = metadata["files"]
        container = metadata.get("container") or {}
        try:
            created_at = datetime.fromisoformat(str(metadata.get("created_at")))
        except ValueError:
            created_at = datetime.now(UTC)
        checkpoint_id = naming.checkpoint_id(str(metadata.get("id", "")))
        name = str(metadata.get("name") or checkpoint_id)
        return cls(
            id=checkpoint_id, name=naming.checkpoint_name(name), state=CheckpointState.COMMITTED,
            tier=tier, dirty=dirty, size_bytes=sum(int(f["size"]) for f in files.values()),
            file_count=len(files), checksums={k: str(v["sha256"]) for k, v in files.items()},
            container_id=str(container.get("id", "")), namespace=str(container.get("namespace", "")),
            pod_namespace=str(container.get("pod_namespace", "")), image=str(container.get("image", "")),
            created_at=created_at, error="")


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS checkpoints (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('staging', 'committed', 'failed')),
    tier          TEXT NOT NULL CHECK (tier IN ('local', 'remote')),
    dirty         INTEGER NOT NULL DEFAULT 0,
    size_bytes    INTEGER NOT NULL DEFAULT 0,
    file_count    INTEGER NOT NULL DEFAULT 0,
    checksums     TEXT NOT NULL DEFAULT '{{}}',
    container_id  TEXT NOT NULL DEFAULT '',
    namespace     TEXT NOT NULL DEFAULT '',
    pod_namespace TEXT NOT NULL DEFAULT '',
    image         TEXT NOT NULL DEFAULT '',
    created_at    TEXT NOT NULL,
    error         TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX IF NOT EXISTS checkpoints_live_name ON checkpoints (namespace, name)
    WHERE state != 'failed';
CREATE INDEX IF NOT EXISTS checkpoints_dirty ON checkpoints (dirty) WHERE dirty = 1;
CREATE TABLE IF NOT EXISTS shares (
    checkpoint_id TEXT NOT NULL REFERENCES checkpoints (id) ON DELETE CASCADE,
    namespace     TEXT NOT NULL,
    pod_namespace TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (checkpoint_id, namespace, pod_namespace)
);
PRAGMA user_version = {SCHEMA_VERSION};
"""

# Version 1 made names unique across the node, failed attempts included, and had no
# pod namespace: rebuild the table once, keeping every row.
_MIGRATE_FROM_1 = """
ALTER TABLE checkpoints RENAME TO checkpoints_v1;
DROP INDEX IF EXISTS checkpoints_dirty;
"""
_COPY_FROM_1 = """
INSERT INTO checkpoints (id, name, state, tier, dirty, size_bytes, file_count, checksums,
                         container_id, namespace, image, created_at, error)
    SELECT id, name, state, tier, dirty, size_bytes, file_count, checksums,
           container_id, namespace, image, created_at, error FROM checkpoints_v1;
DROP TABLE checkpoints_v1;
"""

_COLUMNS = ("id", "name", "state", "tier", "dirty", "size_bytes", "file_count", "checksums",
            "container_id", "namespace", "pod_namespace", "image", "created_at", "error")
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM checkpoints"


def _row(values: tuple[Any, ...]) -> CheckpointRow:
    record = dict(zip(_COLUMNS, values, strict=True))
    return CheckpointRow(
        id=record["id"], name=record["name"], state=CheckpointState(record["state"]),
        tier=Tier(record["tier"]), dirty=bool(record["dirty"]), size_bytes=record["size_bytes"],
        file_count=record["file_count"], checksums=json.loads(record["checksums"]),
        container_id=record["container_id"], namespace=record["namespace"],
        pod_namespace=record["pod_namespace"], image=record["image"],
        created_at=datetime.fromisoformat(record["created_at"]), error=record["error"],
    )


def split_reference(reference: str, namespace: str) -> tuple[str, str] | str:
    """A checkpoint reference: an id (returned as is), "name" (in `namespace`) or
    "namespace/name"; the (namespace, name) pair for the latter two."""
    if not reference:
        raise InvalidArgument("a checkpoint id or name is required")
    if naming.is_checkpoint_id(reference):
        return reference
    if "/" in reference:
        owner, _, name = reference.partition("/")
        return naming.containerd_namespace(owner), naming.checkpoint_name(name)
    if not namespace:
        raise InvalidArgument(f"checkpoint name {reference!r} needs a namespace: use namespace/name")
    return naming.containerd_namespace(namespace), naming.checkpoint_name(reference)


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
        db.execute("PRAGMA foreign_keys=ON")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        has_table = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'checkpoints'").fetchone()
        if has_table and version < SCHEMA_VERSION:
            try:  # one transaction: a migration that stops half way leaves version 1 as it was
                db.executescript("BEGIN IMMEDIATE;" + _MIGRATE_FROM_1 + _SCHEMA + _COPY_FROM_1 + "COMMIT;")
            except sqlite3.Error:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                db.close()
                raise
        elif version > SCHEMA_VERSION:
            db.close()
            raise InvalidArgument(f"registry {self._path} has schema {version}, newer than this agent's"
                                  f" {SCHEMA_VERSION}: upgrade the agent")
        else:
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
                          image: str, pod_namespace: str = "",
                          created_at: datetime | None = None) -> None:
        created = (created_at or datetime.now(UTC)).isoformat()

        def insert() -> None:
            try:
                self._conn().execute(
                    "INSERT INTO checkpoints (id, name, state, tier, created_at, container_id, namespace,"
                    " pod_namespace, image) VALUES (?, ?, 'staging', 'local', ?, ?, ?, ?, ?)",
                    (id, name, created, container_id, namespace, pod_namespace, image),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"namespace {namespace!r} already has a checkpoint named {name!r}"
                                    " (or the id exists)") from None

        await self._run(insert)

    async def mark_committed(self, id: str, *, size_bytes: int, file_count: int,
                             checksums: dict[str, str], dirty: bool) -> None:
        """The checkpoint's data is committed on disk; whatever the row said before
        (staging, or failed by a registry that lagged behind the disk)."""
        await self._update(id, "state = 'committed', tier = 'local', dirty = ?, size_bytes = ?,"
                           " file_count = ?, checksums = ?, error = ''",
                           int(dirty), size_bytes, file_count, json.dumps(checksums, sort_keys=True))

    async def add_committed(self, row: CheckpointRow) -> CheckpointRow:
        """Record a committed checkpoint found elsewhere (a download from another node,
        a directory the registry lost). If its name is taken in its namespace, it is
        recorded under its id instead; returns the row as recorded."""
        def insert() -> CheckpointRow:
            db = self._conn()
            taken = db.execute("SELECT 1 FROM checkpoints WHERE namespace = ? AND name = ? AND id != ?"
                               " AND state != 'failed'", (row.namespace, row.name, row.id)).fetchone()
            recorded = dataclasses.replace(row, name=row.id) if taken else row
            db.execute(
                f"INSERT OR REPLACE INTO checkpoints ({', '.join(_COLUMNS)})"
                f" VALUES ({', '.join('?' * len(_COLUMNS))})",
                (recorded.id, recorded.name, recorded.state.value, recorded.tier.value, int(recorded.dirty),
                 recorded.size_bytes, recorded.file_count, json.dumps(recorded.checksums, sort_keys=True),
                 recorded.container_id, recorded.namespace, recorded.pod_namespace, recorded.image,
                 recorded.created_at.isoformat(), recorded.error),
            )
            return recorded
        return await self._run(insert)

    async def mark_failed(self, id: str, error: str) -> None:
        await self._update(id, "state = 'failed', dirty = 0, error = ?", error)

    async def mark_uploaded(self, id: str) -> None:
        await self._update(id, "tier = 'remote', dirty = 0")

    async def mark_dirty(self, id: str) -> None:
        """To be uploaded (again): an operator asked for it."""
        await self._update(id, "tier = 'local', dirty = 1")

    async def mark_remote_removed(self, id: str) -> None:
        """Its remote copy is gone, its local copy stays: local again, and clean (the
        promoter must not upload what an operator or the retention policy removed)."""
        await self._update(id, "tier = 'local', dirty = 0")

    async def delete(self, id: str) -> None:
        """Forget a checkpoint (its shares go with it)."""
        def delete() -> None:
            cursor = self._conn().execute("DELETE FROM checkpoints WHERE id = ?", (id,))
            if cursor.rowcount == 0:
                raise NotFound(f"checkpoint {id} is not in the registry")
        await self._run(delete)

    async def _update(self, id: str, assignments: str, *params: Any) -> None:
        def update() -> None:
            try:
                cursor = self._conn().execute(f"UPDATE checkpoints SET {assignments} WHERE id = ?",
                                              (*params, id))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"checkpoint {id}: its name is taken by another checkpoint of its"
                                    " namespace") from None
            if cursor.rowcount == 0:
                raise NotFound(f"checkpoint {id} is not in the registry")
        await self._run(update)

    # -- shares ---------------------------------------------------------------

    async def share(self, id: str, share: Share) -> None:
        def insert() -> None:
            try:
                self._conn().execute(
                    "INSERT OR IGNORE INTO shares (checkpoint_id, namespace, pod_namespace) VALUES (?, ?, ?)",
                    (id, share.namespace, share.pod_namespace))
            except sqlite3.IntegrityError:
                raise NotFound(f"checkpoint {id} is not in the registry") from None
        await self._run(insert)

    async def revoke(self, id: str, share: Share) -> None:
        def delete() -> None:
            self._conn().execute(
                "DELETE FROM shares WHERE checkpoint_id = ? AND namespace = ? AND pod_namespace = ?",
                (id, share.namespace, share.pod_namespace))
        await self._run(delete)

    async def shares(self, id: str) -> list[Share]:
        def select() -> list[Share]:
            cur = self._conn().execute(
                "SELECT namespace, pod_namespace FROM shares WHERE checkpoint_id = ?"
                " ORDER BY namespace, pod_namespace", (id,))
            return [Share(ns, pod_ns) for ns, pod_ns in cur]
        return await self._run(select)

    # -- reads ----------------------------------------------------------------

    async def get(self, id: str) -> CheckpointRow:
        """The checkpoint with this id."""
        if not id:
            raise InvalidArgument("a checkpoint id is required")

        def select() -> CheckpointRow:
            values = self._conn().execute(f"{_SELECT} WHERE id = ?", (id,)).fetchone()
            if values is None:
                raise NotFound(f"checkpoint {id!r} is not in the registry")
            return _row(values)

        return await self._run(select)

    async def find(self, namespace: str, name: str) -> CheckpointRow:
        """The checkpoint called `name` in `namespace` (the live one, else the newest
        failed attempt)."""
        def select() -> CheckpointRow:
            values = self._conn().execute(
                f"{_SELECT} WHERE namespace = ? AND name = ?"
                " ORDER BY state != 'failed' DESC, created_at DESC, id DESC LIMIT 1",
                (namespace, name)).fetchone()
            if values is None:
                raise NotFound(f"namespace {namespace!r} has no checkpoint named {name!r} in the registry")
            return _row(values)

        return await self._run(select)

    async def lookup(self, reference: str, namespace: str = "") -> CheckpointRow:
        """A checkpoint by id, by "namespace/name", or by name within `namespace`."""
        where = split_reference(reference, namespace)
        if isinstance(where, str):
            return await self.get(where)
        return await self.find(*where)

    async def all(self, state: CheckpointState | None = None) -> list[CheckpointRow]:
        def select() -> list[CheckpointRow]:
            query, params = _SELECT, tuple[str, ...]()
            if state is not None:
                query, params = f"{_SELECT} WHERE state = ?", (state.value,)
            return [_row(v) for v in self._conn().execute(query + " ORDER BY created_at, id", params)]
        return await self._run(select)

    async def dirty(self) -> list[CheckpointRow]:
        def select() -> list[CheckpointRow]:
            cur = self._conn().execute(f"{_SELECT} WHERE dirty = 1 AND state = 'committed' ORDER BY created_at")
            return [_row(v) for v in cur]
        return await self._run(select)

    async def dirty_count(self) -> int:
        def count() -> int:
            return int(self._conn().execute(
                "SELECT COUNT(*) FROM checkpoints WHERE dirty = 1 AND state = 'committed'").fetchone()[0])
        return await self._run(count)
