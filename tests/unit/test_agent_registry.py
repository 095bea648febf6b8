"""The SQLite registry: states, dirty rows, lookup by id or name, persistence."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from kybernate.agent.registry import CheckpointState, Registry, Tier
from kybernate.errors import AlreadyExists, NotFound


def run(coro):
    return asyncio.run(coro)


async def _open(path: Path) -> Registry:
    registry = Registry(path)
    await registry.open()
    return registry


def test_lifecycle_and_lookup(tmp_path: Path) -> None:
    async def scenario() -> None:
        registry = await _open(tmp_path / "r.db")
        try:
            await registry.add_staging("id-1", "web-a", container_id="web", namespace="default", image="img:1")
            row = await registry.get("web-a")
            assert (row.state, row.tier, row.dirty) == (CheckpointState.STAGING, Tier.LOCAL, False)
            await registry.mark_committed("id-1", size_bytes=123, file_count=2,
                                          checksums={"a": "00", "b": "11"}, dirty=True)
            row = await registry.get("id-1")
            assert row.state is CheckpointState.COMMITTED and row.dirty and row.size_bytes == 123
            assert row.checksums == {"a": "00", "b": "11"}
            assert [r.id for r in await registry.dirty()] == ["id-1"]
            assert await registry.dirty_count() == 1
            await registry.mark_uploaded("id-1")
            row = await registry.get("id-1")
            assert (row.tier, row.dirty) == (Tier.REMOTE, False)
            assert await registry.dirty_count() == 0
        finally:
            await registry.close()
    run(scenario())


def test_duplicate_name_and_unknown_ids(tmp_path: Path) -> None:
    async def scenario() -> None:
        registry = await _open(tmp_path / "r.db")
        try:
            await registry.add_staging("id-1", "same", container_id="c", namespace="n", image="")
            with pytest.raises(AlreadyExists, match="same"):
                await registry.add_staging("id-2", "same", container_id="c", namespace="n", image="")
            with pytest.raises(NotFound, match="nope"):
                await registry.get("nope")
            with pytest.raises(NotFound):
                await registry.mark_failed("id-9", "boom")
        finally:
            await registry.close()
    run(scenario())


def test_failed_rows_are_never_dirty_and_state_filter(tmp_path: Path) -> None:
    async def scenario() -> None:
        registry = await _open(tmp_path / "r.db")
        try:
            await registry.add_staging("a", "a", container_id="c", namespace="n", image="")
            await registry.add_staging("b", "b", container_id="c", namespace="n", image="")
            await registry.mark_committed("a", size_bytes=1, file_count=1, checksums={}, dirty=True)
            await registry.mark_failed("b", "CRIU said no")
            assert [r.id for r in await registry.all(CheckpointState.FAILED)] == ["b"]
            assert (await registry.get("b")).error == "CRIU said no"
            assert [r.id for r in await registry.dirty()] == ["a"]
        finally:
            await registry.close()
    run(scenario())


def test_rows_survive_reopen(tmp_path: Path) -> None:
    async def scenario() -> None:
        registry = await _open(tmp_path / "r.db")
        await registry.add_staging("a", "a", container_id="c", namespace="n", image="")
        await registry.mark_committed("a", size_bytes=5, file_count=1, checksums={"f": "aa"}, dirty=True)
        await registry.close()
        registry = await _open(tmp_path / "r.db")
        try:
            row = await registry.get("a")
            assert row.state is CheckpointState.COMMITTED and row.dirty and row.checksums == {"f": "aa"}
        finally:
            await registry.close()
    run(scenario())
