"""Seals: a local copy whose files are as they were sealed is restored without a hash;
any change (content, mode, a replaced file) makes it hashed again, and a tampered file
is refused by name. containerd's copy of a checkpoint this node sealed is swapped for
the sealed copy only for a requester who may restore that one."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from kybernate.agent import commit
from kybernate.agent.access import Party
from kybernate.agent.local_tier import LocalTier
from kybernate.agent.registry import Registry
from kybernate.agent.restore import RestorePreparer
from kybernate.errors import DataLoss

from tests.support.checkpoints import CRIU_VERSION, committed, register


class NoGpus:
    """The GPU fit of a checkpoint without GPUs (no driver on this machine)."""

    backend_name = "none"

    async def restore_fit(self, metadata: Any) -> dict[str, str]:
        return {}


def _sealed(local: LocalTier, namespace: str = "default") -> tuple[str, Path]:
    checkpoint_id, final = committed(local, namespace=namespace)
    files = commit.read_metadata(final)["files"]
    local.seals.record(checkpoint_id, final, [*files, commit.METADATA_FILE])
    return checkpoint_id, final


def _rewrite_keeping_mtime(path: Path, data: bytes) -> None:
    """What a careful tamperer does: same size, mtime set back."""
    before = path.stat()
    path.chmod(0o644)
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_sealed_copy_matches_and_is_read_only(tmp_path: Path) -> None:
    local = LocalTier(tmp_path / "tier")
    checkpoint_id, final = _sealed(local)
    assert local.seals.matching(checkpoint_id, final) == {"pages-1.img", "core-1.img", "metadata.json"}
    assert all((final / rel).stat().st_mode & 0o777 == 0o444 for rel in ("pages-1.img", "metadata.json"))


def test_a_rewrite_with_the_old_mtime_breaks_the_seal(tmp_path: Path) -> None:
    local = LocalTier(tmp_path / "tier")
    checkpoint_id, final = _sealed(local)
    pages = final / "pages-1.img"
    _rewrite_keeping_mtime(pages, b"\0" * pages.stat().st_size)
    assert local.seals.matching(checkpoint_id, final) == {"core-1.img", "metadata.json"}


def test_a_changed_metadata_json_trusts_nothing(tmp_path: Path) -> None:
    local = LocalTier(tmp_path / "tier")
    checkpoint_id, final = _sealed(local)
    metadata = final / commit.METADATA_FILE
    _rewrite_keeping_mtime(metadata, metadata.read_bytes())
    assert local.seals.matching(checkpoint_id, final) == frozenset()


def test_a_replaced_file_breaks_the_seal(tmp_path: Path) -> None:
    local = LocalTier(tmp_path / "tier")
    checkpoint_id, final = _sealed(local)
    replacement = tmp_path / "core"
    replacement.write_bytes((final / "core-1.img").read_bytes())
    os.rename(replacement, final / "core-1.img")
    assert "core-1.img" not in local.seals.matching(checkpoint_id, final)


class Counting:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.hashed: list[str] = []
        real = commit.sha256_file

        def counted(path: Path) -> str:
            self.hashed.append(path.name)
            return real(path)

        monkeypatch.setattr(commit, "sha256_file", counted)


async def _registered(tmp_path: Path, namespace: str = "default"
                      ) -> tuple[LocalTier, str, Path, RestorePreparer, Registry]:
    """A sealed checkpoint of `namespace`, its registry row, and a preparer for it."""
    local = LocalTier(tmp_path / "tier")
    checkpoint_id, final = _sealed(local, namespace=namespace)
    registry = Registry(tmp_path / "registry.db")
    await registry.open()
    await register(registry, checkpoint_id, final, namespace=namespace)
    preparer = RestorePreparer(registry, local, None, NoGpus(), CRIU_VERSION)  # type: ignore[arg-type]
    return local, checkpoint_id, final, preparer, registry


def test_restore_of_a_sealed_checkpoint_hashes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        _, checkpoint_id, final, preparer, registry = await _registered(tmp_path)
        counting = Counting(monkeypatch)
        prepared = await preparer.from_registry(checkpoint_id, Party("default"))
        assert prepared.image_dir == final and counting.hashed == []
        await registry.close()

    asyncio.run(scenario())


def test_restore_hashes_a_file_whose_seal_broke_and_refuses_it_if_altered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        local, checkpoint_id, final, preparer, registry = await _registered(tmp_path)
        counting = Counting(monkeypatch)
        # Only the mode changed: hashed again, verifies, sealed again.
        (final / "core-1.img").chmod(0o600)
        await preparer.from_registry(checkpoint_id, Party("default"))
        assert counting.hashed == ["core-1.img"]
        assert "core-1.img" in local.seals.matching(checkpoint_id, final)
        pages = final / "pages-1.img"
        _rewrite_keeping_mtime(pages, b"\0" * pages.stat().st_size)
        with pytest.raises(DataLoss, match=r"pages-1\.img failed its sha256 check"):
            await preparer.from_registry(checkpoint_id, Party("default"))
        await registry.close()

    asyncio.run(scenario())


def test_containerds_copy_is_swapped_for_the_sealed_one_only_for_its_owner(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        _, _, final, preparer, registry = await _registered(tmp_path, "team-a")
        unpacked = tmp_path / "ctrd-checkpoint1"
        shutil.copytree(final, unpacked)
        counting = Counting(monkeypatch)

        prepared = await preparer.from_containerd(unpacked, Party("team-a"))
        assert prepared.image_dir == final and counting.hashed == []

        # Another namespace gets its own copy verified, never ours.
        prepared = await preparer.from_containerd(unpacked, Party("team-b"))
        assert prepared.image_dir == unpacked and sorted(counting.hashed) == ["core-1.img", "pages-1.img"]

        # Altered pages in containerd's copy: the owner restores ours (the copy's
        # bytes are never used); anyone else has the copy verified, and refused.
        counting.hashed.clear()
        pages = unpacked / "pages-1.img"
        pages.chmod(0o644)
        pages.write_bytes(b"\0" * pages.stat().st_size)
        assert (await preparer.from_containerd(unpacked, Party("team-a"))).image_dir == final
        with pytest.raises(DataLoss, match=r"pages-1\.img failed its sha256 check"):
            await preparer.from_containerd(unpacked, Party("team-b"))
        await registry.close()

    asyncio.run(scenario())
