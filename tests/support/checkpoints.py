"""Committed checkpoints for storage tests: real files sealed by the real commit protocol."""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from kybernate.agent import commit, naming
from kybernate.agent.local_tier import LocalTier
from kybernate.agent.registry import Registry

CRIU_VERSION = "4.2.1"


def committed(local: LocalTier, files: Mapping[str, bytes] | None = None, *, checkpoint_id: str = "",
              name: str = "", namespace: str = "default") -> tuple[str, Path]:
    """(id, directory) of a new checkpoint committed in `local` with `files`
    (default: a small pages image and a core image)."""
    checkpoint_id = checkpoint_id or naming.new_checkpoint_id()
    local.prepare()
    staging = local.staging(checkpoint_id)
    staging.mkdir()
    for rel, data in (files or {"pages-1.img": os.urandom(300_000), "core-1.img": b"core"}).items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(data)
    final = local.committed(checkpoint_id)
    commit.commit(staging, final, {
        "id": checkpoint_id, "name": name or f"ck-{checkpoint_id}", "created_at": datetime.now(UTC).isoformat(),
        "container": {"id": "c1", "namespace": namespace, "image": ""},
        "host": {"criu_version": CRIU_VERSION}})
    return checkpoint_id, final


async def register(registry: Registry, checkpoint_id: str, final: Path, *, namespace: str = "default",
                   name: str = "") -> None:
    """A dirty committed registry row for a checkpoint made by `committed`."""
    document = commit.read_metadata(final)
    files = document["files"]
    await registry.add_staging(checkpoint_id, name or document["name"], container_id="c1", namespace=namespace,
                               image="")
    await registry.mark_committed(checkpoint_id, size_bytes=sum(f["size"] for f in files.values()),
                                  file_count=len(files), checksums={k: v["sha256"] for k, v in files.items()},
                                  dirty=True)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` (file contents, None for directories): to show that nothing
    was written where it should not be."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}
