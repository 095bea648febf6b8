"""Fetch: bring a remote checkpoint into the local tier, durably and verified.

A download goes to `<local_tier>/.fetch-<id>` (a prefix of its own: start-up recovery
never takes it for the pipeline's `.staging-<id>`, nor for a checkpoint). Every file
and directory is fsynced, every file was checked against metadata.json's sha256 in
the same read that checks the server's CRC (`RemoteTier.download`), the listing and
sizes against metadata.json (`commit.verify`), renamed to `<local_tier>/<id>`, the
parent fsynced, and the copy sealed (`kybernate.agent.seal`), so that the restore
that asked for it does not hash it again. Only then
does the checkpoint count as local: a crash at any point before leaves a `.fetch-`
directory, which is never trusted and which `remove_leftover_fetches` removes.

Two fetches of one checkpoint in one agent share one download.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from kybernate.agent import commit, naming
from kybernate.agent.local_tier import LocalTier
from kybernate.agent.remote import RemoteTier
from kybernate.api import layout
from kybernate.errors import FailedPrecondition

log = logging.getLogger(__name__)

FETCH_PREFIX = ".fetch-"


def fetch_path(local: LocalTier, checkpoint_id: str) -> Path:
    return local.root / f"{FETCH_PREFIX}{checkpoint_id}"


def remove_leftover_fetches(local: LocalTier) -> list[Path]:
    """Remove every `.fetch-` directory (downloads a previous agent never finished);
    returns what it removed. Blocking; call it at start-up, before any fetch."""
    if not local.root.is_dir():
        return []
    removed = []
    for path in sorted(local.root.iterdir()):
        if path.name.startswith(FETCH_PREFIX):
            log.warning("removing unfinished download %s", path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    if removed:
        _fsync_directory(local.root)
    return removed


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory, deepest first."""
    directories = [root]
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            continue  # never written by a download; verify() refuses it
        if path.is_dir():
            directories.append(path)
        else:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for directory in sorted(directories, key=lambda p: len(p.parts), reverse=True):
        _fsync_directory(directory)


def _fetch_blocking(remote: RemoteTier, local: LocalTier, checkpoint_id: str, criu_version: str | None,
                    progress: Callable[[int], None] | None = None,
                    on_total: Callable[[int], None] | None = None) -> Path:
    local.prepare()
    final = local.committed(checkpoint_id)
    if final.exists() or final.is_symlink():
        raise FailedPrecondition(f"{final} exists but is not a committed checkpoint (no {layout.METADATA_FILE});"
                                 " start-up recovery removes such a directory, a fetch never writes into it")
    staging = fetch_path(local, checkpoint_id)
    if staging.exists():
        shutil.rmtree(staging)  # an earlier attempt's leftover: never trusted, never resumed
    try:
        document = remote.download(checkpoint_id, staging, max_bytes=local.free_bytes(), progress=progress,
                                   on_total=on_total)
        _fsync_tree(staging)
        # The download hashed every file as it checked the server's CRC: here only
        # the listing, the sizes and the CRIU version are checked, then it is sealed.
        downloaded = frozenset(document.get("files") or ())
        commit.verify(staging, criu_version=criu_version, trusted=downloaded)
        os.rename(staging, final)
        _fsync_directory(final.parent)
        local.seals.record(checkpoint_id, final, [*downloaded, layout.METADATA_FILE])
        return final
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


class Fetcher:
    """Fetches for one agent; concurrent fetches of one checkpoint share one download."""

    def __init__(self, remote: RemoteTier, local: LocalTier, *, criu_version: str | None) -> None:
        self._remote = remote
        self._local = local
        self._criu_version = criu_version
        self._in_flight: dict[str, asyncio.Task[Path]] = {}

    async def fetch(self, checkpoint_id: str, *, progress: Callable[[int], None] | None = None,
                    on_total: Callable[[int], None] | None = None) -> Path:
        """The committed local directory of `checkpoint_id`, downloaded if needed.

        NotFound when the bucket has no complete checkpoint of that id, DataLoss for
        one that fails a check, FailedPrecondition for another CRIU major version.
        A caller's cancellation does not stop the download others may be waiting for.
        `progress` and `on_total` (called from threads) hear of the download this call
        starts; one that joins a download in flight hears nothing.
        """
        checkpoint_id = naming.checkpoint_id(checkpoint_id)
        if self._local.has(checkpoint_id):
            return self._local.committed(checkpoint_id)
        task = self._in_flight.get(checkpoint_id)
        if task is None:
            task = asyncio.create_task(
                asyncio.to_thread(_fetch_blocking, self._remote, self._local, checkpoint_id, self._criu_version,
                                  progress, on_total),
                name=f"fetch-{checkpoint_id}")
            self._in_flight[checkpoint_id] = task
            task.add_done_callback(lambda done: self._finished(checkpoint_id, done))
        return await asyncio.shield(task)

    def _finished(self, checkpoint_id: str, task: asyncio.Task[Path]) -> None:
        if self._in_flight.get(checkpoint_id) is task:
            del self._in_flight[checkpoint_id]
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.info("fetch of checkpoint %s failed: %s", checkpoint_id, exc)
