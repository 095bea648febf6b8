"""Start-up recovery: the registry made to agree with the disk before the first request.

A previous agent may have stopped at any point: during a dump, between the dump and the
commit, during a download, or with rows the disk no longer backs. What is complete and
verifies is committed; what is not is removed and its row marked failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from pathlib import Path

from kybernate.agent import commit, naming
from kybernate.agent.config import AgentConfig
from kybernate.agent.fetch import remove_leftover_fetches
from kybernate.agent.local_tier import LocalTier
from kybernate.agent.registry import CheckpointRow, CheckpointState, Registry, Tier
from kybernate.errors import KybernateError, NotFound

log = logging.getLogger(__name__)

LEFTOVER_REASON = "the agent stopped before the checkpoint committed"
#: Logs of failed checkpoints (CRIU's dump.log) kept for the operator, newest first.
FAILED_LOGS_KEPT = 50


async def recover(config: AgentConfig, local: LocalTier, registry: Registry) -> None:
    """Make the registry agree with the disk before the first request.

    - A staging directory whose data is complete (its draft says the dump finished,
      on this boot) is committed; any other is a failed checkpoint and goes.
    - A committed directory whose metadata verifies is committed, whatever its row
      says; a row whose local data is gone (and never reached the remote tier) is
      failed; a row still `staging` is failed.
    - A committed directory no row knows (a lost registry) gets its row back.
    - A download that never completed (a `.fetch-` directory) is removed.
    - CRIU work directories of unfinished checkpoints keep their logs with the
      other failures; only the newest `FAILED_LOGS_KEPT` are kept.
    """
    dirty = config.s3 is not None
    for leftover in await asyncio.to_thread(remove_leftover_fetches, local):
        log.warning("removed a download that never completed: %s", leftover)
    for leftover in await asyncio.to_thread(local.remove_leftover_deletions):
        log.warning("finished removing %s", leftover)
    for checkpoint_id, path in local.leftover_staging():
        document = None
        if naming.is_checkpoint_id(checkpoint_id) and not local.committed(checkpoint_id).exists():
            try:
                document = await asyncio.to_thread(commit.recover, path, local.committed(checkpoint_id))
            except (KybernateError, OSError) as exc:
                log.error("checkpoint %s: its complete data could not be committed: %s", checkpoint_id, exc)
        if document is not None:
            log.warning("committed checkpoint %s, left complete in staging by a stopped agent", checkpoint_id)
            await asyncio.to_thread(shutil.rmtree, config.work_root / checkpoint_id, True)
            continue  # its row is reconciled below, with the others
        log.warning("removing uncommitted checkpoint %s (%s)", checkpoint_id, path)
        with contextlib.suppress(NotFound):
            await registry.mark_failed(checkpoint_id, LEFTOVER_REASON)
        await asyncio.to_thread(shutil.rmtree, path, True)

    rows = {row.id: row for row in await registry.all()}
    for row in rows.values():
        if local.has(row.id):
            if row.state is not CheckpointState.COMMITTED:
                await _reconcile_committed(local, registry, row.id, dirty=dirty)
        elif row.state is CheckpointState.STAGING:
            await registry.mark_failed(row.id, LEFTOVER_REASON)
        elif row.state is CheckpointState.COMMITTED and row.tier is Tier.LOCAL:
            log.error("checkpoint %s (%s): its data is missing from %s", row.id, row.qualified_name, local.root)
            await registry.mark_failed(row.id, f"its data is missing from the local tier {local.root}")
    for checkpoint_id in local.committed_ids():
        if checkpoint_id not in rows:
            await _reconcile_committed(local, registry, checkpoint_id, dirty=dirty)

    if config.work_root.is_dir():
        for work in config.work_root.iterdir():
            target = config.failed_root / work.name
            if target.exists():
                await asyncio.to_thread(shutil.rmtree, work, True)
            else:
                await asyncio.to_thread(shutil.move, str(work), str(target))
    await asyncio.to_thread(_prune_oldest, config.failed_root, FAILED_LOGS_KEPT)


async def _reconcile_committed(local: LocalTier, registry: Registry, checkpoint_id: str, *,
                               dirty: bool) -> None:
    """A committed directory the registry does not show as committed: verify it,
    then record it (or leave the row as it is, if it does not verify)."""
    try:
        metadata = await asyncio.to_thread(commit.verify, local.committed(checkpoint_id))
        row = CheckpointRow.from_metadata(metadata, tier=Tier.LOCAL, dirty=dirty)
    except KybernateError as exc:
        log.error("checkpoint %s in %s does not verify, leaving it alone: %s", checkpoint_id,
                  local.root, exc)
        return
    if row.id != checkpoint_id:
        log.error("checkpoint directory %s holds checkpoint %s; leaving it alone", checkpoint_id, row.id)
        return
    try:
        await registry.mark_committed(checkpoint_id, size_bytes=row.size_bytes, file_count=row.file_count,
                                      checksums=row.checksums, dirty=dirty)
    except NotFound:
        row = await registry.add_committed(row)
    log.warning("registry: checkpoint %s (%s) is committed on disk; recorded so", checkpoint_id,
                row.qualified_name)


def _prune_oldest(directory: Path, keep: int) -> None:
    if not directory.is_dir():
        return
    entries = sorted(directory.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)
