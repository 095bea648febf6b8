"""Verification of the pages images while CRIU restores.

What a restore must hash (a copy with no seal: containerd's, a host directory's, a
local copy whose seal broke) is split in two. PrepareRestore hashes the small images
CRIU parses first (inventory, core, mm, pagemap, fdinfo, ...) before anything runs;
the pages images, nearly all of the bytes, are hashed here in the background while
CRIU restores, which needs nothing of them until its restorer reads them. The shim
holds CRIU's restored tasks in CRIU's post-restore step (an action script) until
AwaitVerification answers: on success they resume and the task is reported Running;
on a mismatch the script fails, CRIU kills every restored task, and Start fails
naming the file.

A verification nobody awaits within `UNCLAIMED_AFTER_S` is forgotten.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kybernate.agent import commit, naming
from kybernate.errors import DataLoss, NotFound

log = logging.getLogger(__name__)

#: The images CRIU's restorer reads last: everything else is parsed before.
DEFERRED_PATTERN = "pages-*.img"
UNCLAIMED_AFTER_S = 600.0


def deferrable(files: Mapping[str, Any]) -> set[str]:
    """The files of a checkpoint whose hash can wait for CRIU's restore."""
    return {rel for rel in files if "/" not in rel and fnmatch.fnmatchcase(rel, DEFERRED_PATTERN)}


def _check(directory: Path, expected: Mapping[str, str]) -> None:
    digests = commit.hash_files(directory, list(expected))
    for rel in sorted(expected):
        if digests[rel] != expected[rel]:
            raise DataLoss(f"checkpoint {directory}: file {rel} failed its sha256 check")


class PendingVerifications:
    """Background hashes of deferred files, by verification id."""

    def __init__(self) -> None:
        self._pending: dict[str, asyncio.Task[None]] = {}

    def start(self, directory: Path, expected: Mapping[str, str],
              on_success: Callable[[], None] | None = None) -> str:
        """Hash `expected` ({relative path: sha256}) under `directory` in the background;
        `on_success` runs (in the hashing thread) once every file matched."""
        verification_id = naming.new_checkpoint_id()

        def verify() -> None:
            _check(directory, expected)
            if on_success is not None:
                on_success()

        task = asyncio.get_running_loop().create_task(asyncio.to_thread(verify),
                                                      name=f"verify-{verification_id}")
        self._pending[verification_id] = task
        task.add_done_callback(self._log_failure)
        asyncio.get_running_loop().call_later(UNCLAIMED_AFTER_S, self._pending.pop, verification_id, None)
        return verification_id

    @staticmethod
    def _log_failure(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s: %s", task.get_name(), exc)

    async def wait(self, verification_id: str) -> None:
        """Until the verification ends; DataLoss naming the file that failed."""
        task = self._pending.get(verification_id)
        if task is None:
            raise NotFound(f"verification {verification_id[:80]!r} is unknown (never started, or expired)")
        try:
            await asyncio.shield(task)
        finally:
            if task.done():
                self._pending.pop(verification_id, None)
