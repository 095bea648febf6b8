"""The local tier: the directory every checkpoint commits to first.

The remote tier is `kybernate.agent.remote`, the promoter that moves checkpoints
from here to there `kybernate.agent.promoter`, and the way back `kybernate.agent.fetch`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

from kybernate.agent import commit, naming
from kybernate.agent.seal import SealStore
from kybernate.api import layout

#: A local copy being removed: renamed first, so that it stops being a checkpoint at
#: once, whatever happens to the removal of its files.
DELETING_PREFIX = ".deleting-"


class CommitsInFlight:
    """Commits running in this agent, by checkpoint id: a restore by name of a
    checkpoint whose Checkpoint call already returned waits for its commit."""

    def __init__(self) -> None:
        self._commits: dict[str, asyncio.Future[Any]] = {}

    def add(self, checkpoint_id: str, done: asyncio.Future[Any]) -> None:
        """Track `done` unless a wider wait (the whole export, thaw and commit) already
        covers this checkpoint."""
        if checkpoint_id in self._commits:
            return
        self._commits[checkpoint_id] = done
        done.add_done_callback(lambda _: self._commits.pop(checkpoint_id, None))

    def running(self, checkpoint_id: str) -> bool:
        return checkpoint_id in self._commits

    async def wait(self, checkpoint_id: str) -> bool:
        """Wait for the commit of `checkpoint_id` if one runs; whether one did."""
        done = self._commits.get(checkpoint_id)
        if done is None:
            return False
        await asyncio.wait([done])
        return True


class LocalTier:
    """The directory every checkpoint commits to first."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.seals = SealStore(root)
        self.in_flight = CommitsInFlight()

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def staging(self, checkpoint_id: str) -> Path:
        return commit.staging_path(self.root, checkpoint_id)

    def committed(self, checkpoint_id: str) -> Path:
        return commit.committed_path(self.root, checkpoint_id)

    def has(self, checkpoint_id: str) -> bool:
        return (self.committed(checkpoint_id) / layout.METADATA_FILE).is_file()

    def leftover_staging(self) -> list[tuple[str, Path]]:
        """(id, path) of every staging directory: each is a checkpoint that never committed."""
        if not self.root.is_dir():
            return []
        return sorted(
            (p.name[len(commit.STAGING_PREFIX):], p)
            for p in self.root.iterdir() if p.name.startswith(commit.STAGING_PREFIX)
        )

    def committed_ids(self) -> list[str]:
        """Ids of every committed checkpoint directory (metadata.json present)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if naming.is_checkpoint_id(p.name) and self.has(p.name))

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def size_bytes(self, checkpoint_id: str) -> int:
        """Bytes of a committed local checkpoint (its files as they are on disk)."""
        directory = self.committed(checkpoint_id)
        return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and not p.is_symlink())

    def remove(self, checkpoint_id: str) -> bool:
        """Remove a committed local checkpoint; whether there was one. Blocking."""
        directory = self.committed(naming.checkpoint_id(checkpoint_id))
        if not directory.exists():
            return False
        doomed = self.root / f"{DELETING_PREFIX}{checkpoint_id}"
        os.rename(directory, doomed)
        commit.fsync_directory(self.root)
        shutil.rmtree(doomed, ignore_errors=True)
        self.seals.remove(checkpoint_id)
        return True

    def remove_leftover_deletions(self) -> list[Path]:
        """Finish removals a stopped agent left half done. Blocking; at start-up."""
        if not self.root.is_dir():
            return []
        leftovers = [p for p in self.root.iterdir() if p.name.startswith(DELETING_PREFIX)]
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
        return leftovers
