"""The local tier: the directory every checkpoint commits to first.

The remote tier is `kybernate.agent.remote`, the promoter that moves checkpoints
from here to there `kybernate.agent.promoter`, and the way back `kybernate.agent.fetch`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from kybernate.agent import commit, naming
from kybernate.api import layout


class LocalTier:
    """The directory every checkpoint commits to first."""

    def __init__(self, root: Path) -> None:
        self.root = root

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
