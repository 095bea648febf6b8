"""Seals: how a restore trusts a local copy without reading it again.

Hashing every byte of a checkpoint before each restore costs as much as CRIU's own
restore (about 1.2 GB/s with SHA-NI here). A checkpoint this agent committed, or
downloaded and hashed, does not need it: at commit its files are made read-only and
their identity is recorded in a root-only sidecar (`<local_tier>/.seals/<id>.json`):
device, inode, size, mtime and ctime of each file, metadata.json included. A write
to a file, a chmod, a rename into its place or a new link all move its ctime, which
no program can set back (utimensat sets only atime and mtime), and a replaced file
has another inode. So a file whose seal still matches holds the bytes that were
hashed when it was sealed, and a restore accepts it with one lstat. Anything that
does not match is hashed in full, as is everything that crossed a boundary (S3, an
archive, containerd's content store): those have no seal until this agent hashed them.

A seal is recorded once the checkpoint's own links are settled: containerd removes
the links the export made into its temporary directory only after packing them, and
that too moves the ctime (see `CheckpointPipeline`, which seals after the thaw).

Blocking file I/O; callers run it in a thread.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from kybernate.agent import naming
from kybernate.errors import DataLoss

log = logging.getLogger(__name__)

SEALS_DIR = ".seals"
SEAL_FORMAT = 1
READ_ONLY = 0o444

#: (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)
Identity = tuple[int, int, int, int, int]


def identity(path: Path) -> Identity | None:
    """The identity of a regular file (never through a symlink); None for anything else."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class SealStore:
    """The seals of one local tier, one JSON file per checkpoint."""

    def __init__(self, local_tier: Path) -> None:
        self.root = local_tier / SEALS_DIR

    def _path(self, checkpoint_id: str) -> Path:
        return self.root / f"{naming.checkpoint_id(checkpoint_id)}.json"

    def record(self, checkpoint_id: str, directory: Path, files: Iterable[str]) -> None:
        """Make `files` (relative to `directory`) read-only and seal them as they are now.

        Only for files whose content was hashed against metadata.json just before."""
        identities: dict[str, list[int]] = {}
        for rel in sorted(set(files)):
            path = directory / rel
            os.chmod(path, READ_ONLY, follow_symlinks=False)
            found = identity(path)
            if found is None:
                raise FileNotFoundError(f"{path} is not a regular file; not sealing {checkpoint_id}")
            identities[rel] = list(found)
        self.root.mkdir(mode=0o700, exist_ok=True)
        path = self._path(checkpoint_id)
        temporary = path.with_name(path.name + ".tmp")
        with temporary.open("w", encoding="utf-8") as f:
            json.dump({"format": SEAL_FORMAT, "id": checkpoint_id, "files": identities}, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(temporary, path)

    def matching(self, checkpoint_id: str, directory: Path) -> frozenset[str]:
        """The files of `directory` whose seal still matches; empty unless metadata.json's
        does (the file list and digests it holds are what the other seals vouch for)."""
        from kybernate.api.layout import METADATA_FILE

        try:
            document = json.loads(self._path(checkpoint_id).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return frozenset()
        recorded = document.get("files") if isinstance(document, dict) else None
        if (not isinstance(recorded, dict) or document.get("format") != SEAL_FORMAT
                or document.get("id") != checkpoint_id):
            return frozenset()
        matched = set()
        for rel, sealed in recorded.items():
            if not isinstance(rel, str) or not isinstance(sealed, list):
                return frozenset()
            try:
                naming.relative_file(rel, "seal")
            except DataLoss:  # a seal we did not write: trust none of it
                return frozenset()
            if identity(directory / rel) == tuple(sealed):
                matched.add(rel)
        if METADATA_FILE not in matched:
            return frozenset()
        return frozenset(matched)

    def remove(self, checkpoint_id: str) -> None:
        try:
            self._path(checkpoint_id).unlink()
        except FileNotFoundError:
            pass
