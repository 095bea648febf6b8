"""The SQLite registry: states, dirty rows, names per namespace (a failed attempt does
not reserve its name), lookups by id and name, shares, persistence, and the migration
of a version-1 database."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kybernate.agent.access import Share
from kybernate.agent.registry import CheckpointRow, CheckpointState, Registry, Tier
from kybernate.errors import AlreadyExists, InvalidArgument, NotFound

ID_A = "20261207T101010000001Z-00000000000000a1"
ID_B = "20261207T101010000002Z-00000000000000b2"
ID_C = "20261207T101010000003Z-00000000000000c3"


def with_registry(path: Path, body: Callable[[Registry], Awaitable[None]]) -> None:
    async def scenario() -> None:
        registry = Registry(path)
        await registry.open()
        try:
            await body(registry)
        finally:
            await registry.close()
    asyncio.run(scenario())


def test_lifecycle_and_lookup(tmp_path: Path) -> None:
    async def body(registry: Registry) -> None:
        await registry.add_staging(ID_A, "web-a", container_id="web", namespace="default", image="img:1",
                                   pod_namespace="team-a")
        row = await registry.lookup("web-a", "default")
        assert (row.id, row.state, row.tier, row.dirty) == (ID_A, CheckpointState.STAGING, Tier.LOCAL, False)
        assert row.pod_namespace == "team-a" and row.qualified_name == "default/web-a"
        assert (await registry.lookup("default/web-a")).id == ID_A
        assert (await registry.lookup(ID_A, "elsewhere")).id == ID_A
        await registry.mark_committed(ID_A, size_bytes=123, file_count=2, checksums={"a": "00", "b": "11"},
                                      dirty=True)
        row = await registry.get(ID_A)
        assert row.state is CheckpointState.COMMITTED and row.dirty and row.size_bytes == 123
        assert row.checksums == {"a": "00", "b": "11"}
        assert [r.id for r in await registry.dirty()] == [ID_A]
        assert await registry.dirty_count() == 1
        await registry.mark_uploaded(ID_A)
        row = await registry.get(ID_A)
        assert (row.tier, row.dirty) == (Tier.REMOTE, False)
        assert await registry.dirty_count() == 0
    with_registry(tmp_path / "r.db", body)


def test_names_are_per_namespace_and_failures_do_not_reserve_them(tmp_path: Path) -> None:
    async def body(registry: Registry) -> None:
        await registry.add_staging(ID_A, "same", container_id="c", namespace="n1", image="")
        with pytest.raises(AlreadyExists, match="same"):
            await registry.add_staging(ID_B, "same", container_id="c", namespace="n1", image="")
        await registry.add_staging(ID_B, "same", container_id="c", namespace="n2", image="")  # another namespace
        await registry.mark_failed(ID_A, "CRIU said no")
        await registry.add_staging(ID_C, "same", container_id="c", namespace="n1", image="")  # the retry
        assert (await registry.find("n1", "same")).id == ID_C
        await registry.mark_committed(ID_C, size_bytes=1, file_count=1, checksums={}, dirty=False)
        assert (await registry.lookup("n1/same")).state is CheckpointState.COMMITTED
        # The failed attempt stays visible by its id.
        assert (await registry.get(ID_A)).error == "CRIU said no"
        # A failed row cannot come back to life while its name is taken again.
        with pytest.raises(AlreadyExists):
            await registry.mark_committed(ID_A, size_bytes=1, file_count=1, checksums={}, dirty=False)
    with_registry(tmp_path / "r.db", body)


def test_unknown_and_malformed_references(tmp_path: Path) -> None:
    async def body(registry: Registry) -> None:
        with pytest.raises(NotFound, match="nope"):
            await registry.lookup("nope", "default")
        with pytest.raises(NotFound):
            await registry.get(ID_B)
        with pytest.raises(NotFound):
            await registry.mark_failed(ID_B, "boom")
        for bad in ("../../etc", "ns/../x", "a/b/c", "-lead", ""):
            with pytest.raises(InvalidArgument):
                await registry.lookup(bad, "default")
        with pytest.raises(InvalidArgument, match="namespace"):
            await registry.lookup("name-only")
    with_registry(tmp_path / "r.db", body)


def test_failed_rows_are_never_dirty_and_state_filter(tmp_path: Path) -> None:
    async def body(registry: Registry) -> None:
        await registry.add_staging(ID_A, "a", container_id="c", namespace="n", image="")
        await registry.add_staging(ID_B, "b", container_id="c", namespace="n", image="")
        await registry.mark_committed(ID_A, size_bytes=1, file_count=1, checksums={}, dirty=True)
        await registry.mark_failed(ID_B, "CRIU said no")
        assert [r.id for r in await registry.all(CheckpointState.FAILED)] == [ID_B]
        assert [r.id for r in await registry.dirty()] == [ID_A]
    with_registry(tmp_path / "r.db", body)


def test_shares(tmp_path: Path) -> None:
    async def body(registry: Registry) -> None:
        await registry.add_staging(ID_A, "golden", container_id="c", namespace="team-a", image="")
        await registry.share(ID_A, Share("k8s.io", "team-b"))
        await registry.share(ID_A, Share("*"))
        await registry.share(ID_A, Share("*"))  # idempotent
        assert [str(s) for s in await registry.shares(ID_A)] == ["*", "k8s.io/team-b"]
        await registry.revoke(ID_A, Share("*"))
        assert await registry.shares(ID_A) == [Share("k8s.io", "team-b")]
        with pytest.raises(NotFound):
            await registry.share(ID_B, Share("x"))
    with_registry(tmp_path / "r.db", body)


def test_a_committed_row_from_elsewhere_never_takes_a_name(tmp_path: Path) -> None:
    async def body(registry: Registry) -> None:
        await registry.add_staging(ID_A, "golden", container_id="c", namespace="n", image="")
        row = CheckpointRow(id=ID_B, name="golden", state=CheckpointState.COMMITTED, tier=Tier.REMOTE,
                            dirty=False, size_bytes=1, file_count=1, checksums={}, container_id="c",
                            namespace="n", image="", created_at=datetime.now(UTC), error="")
        recorded = await registry.add_committed(row)
        assert recorded.name == ID_B
        assert (await registry.lookup("n/golden")).id == ID_A
    with_registry(tmp_path / "r.db", body)


def test_rows_survive_reopen(tmp_path: Path) -> None:
    async def commit_one(registry: Registry) -> None:
        await registry.add_staging(ID_A, "a", container_id="c", namespace="n", image="")
        await registry.mark_committed(ID_A, size_bytes=5, file_count=1, checksums={"f": "aa"}, dirty=True)

    async def read_back(registry: Registry) -> None:
        row = await registry.get(ID_A)
        assert row.state is CheckpointState.COMMITTED and row.dirty and row.checksums == {"f": "aa"}
    with_registry(tmp_path / "r.db", commit_one)
    with_registry(tmp_path / "r.db", read_back)


def test_a_version_1_database_is_migrated_keeping_every_row(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript("""
        CREATE TABLE checkpoints (
            id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE,
            state TEXT NOT NULL CHECK (state IN ('staging', 'committed', 'failed')),
            tier TEXT NOT NULL CHECK (tier IN ('local', 'remote')), dirty INTEGER NOT NULL DEFAULT 0,
            size_bytes INTEGER NOT NULL DEFAULT 0, file_count INTEGER NOT NULL DEFAULT 0,
            checksums TEXT NOT NULL DEFAULT '{}', container_id TEXT NOT NULL DEFAULT '',
            namespace TEXT NOT NULL DEFAULT '', image TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL, error TEXT NOT NULL DEFAULT '');
        CREATE INDEX checkpoints_dirty ON checkpoints (dirty) WHERE dirty = 1;
        INSERT INTO checkpoints (id, name, state, tier, dirty, created_at, namespace)
            VALUES ('20261101T000000Z-0000000a', 'old', 'failed', 'local', 0, '2026-11-01T00:00:00+00:00', 'n'),
                   ('20261101T000001Z-0000000b', 'kept', 'committed', 'local', 1, '2026-11-01T00:00:01+00:00', 'n');
    """)
    db.close()

    async def body(registry: Registry) -> None:
        assert [r.name for r in await registry.all()] == ["old", "kept"]
        assert [r.name for r in await registry.dirty()] == ["kept"]
        await registry.add_staging(ID_A, "old", container_id="c", namespace="n", image="")  # failed: free now
    with_registry(path, body)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 2


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    sqlite3.connect(path).execute("PRAGMA user_version = 99")

    async def body(registry: Registry) -> None:
        raise AssertionError("opened")
    with pytest.raises(InvalidArgument, match="newer"):
        with_registry(path, body)
