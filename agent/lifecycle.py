"""The checkpoint lifecycle an operator drives: remove, collect (the retention policy),
promote (upload now), fetch (download ahead of a restore), verify; and the tier
occupancy the metrics report.

Every removal asks `InUse` first: nothing a restore, upload, fetch or export is using
right now is removed, by an operator or by the policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from datetime import UTC, datetime

from kybernate.agent import commit, retention
from kybernate.agent.access import Party
from kybernate.agent.config import AgentConfig
from kybernate.agent.inuse import InUse
from kybernate.agent.local_tier import LocalTier
from kybernate.agent.metrics import AgentMetrics
from kybernate.agent.promoter import Promoter
from kybernate.agent.registry import CheckpointRow, CheckpointState, Registry, Tier
from kybernate.agent.remote import RemoteTier
from kybernate.agent.restore import RestorePreparer
from kybernate.agent.transfer import TransferMeter
from kybernate.errors import FailedPrecondition, KybernateError, NotFound, Unavailable

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Removal:
    row: CheckpointRow
    removed_local: bool
    removed_remote: bool
    freed_local_bytes: int = 0
    freed_remote_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class Collection:
    collected: list[tuple[CheckpointRow, retention.Decision]]
    kept: list[str]
    freed_local_bytes: int
    freed_remote_bytes: int


class Lifecycle:
    def __init__(self, config: AgentConfig, registry: Registry, local: LocalTier, remote: RemoteTier | None,
                 promoter: Promoter | None, preparer: RestorePreparer, inuse: InUse,
                 metrics: AgentMetrics) -> None:
        self._config = config
        self._registry = registry
        self._local = local
        self._remote = remote
        self._promoter = promoter
        self._preparer = preparer
        self._inuse = inuse
        self._metrics = metrics
        self._collecting = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []

    # -- background ---------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._occupancy_loop(), name="tier-occupancy")]
        policy = self._config.retention
        if policy.active and policy.interval_s > 0:
            self._tasks.append(asyncio.create_task(self._retention_loop(policy.interval_s), name="retention"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _retention_loop(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                result = await self.collect()
            except Exception:
                log.exception("retention policy run failed")
                continue
            if result.collected:
                log.info("retention policy removed %d checkpoint copies (%d local bytes, %d remote bytes)",
                         len(result.collected), result.freed_local_bytes, result.freed_remote_bytes)

    async def _occupancy_loop(self) -> None:
        while True:
            try:
                await self.refresh_occupancy()
            except Exception:
                log.exception("counting tier occupancy failed")
            await asyncio.sleep(self._config.occupancy_interval_s)

    async def refresh_occupancy(self) -> None:
        rows = await self._registry.all(CheckpointState.COMMITTED)
        local = [row for row in rows if self._local.has(row.id)]
        remote = [row for row in rows if row.tier is Tier.REMOTE]
        self._metrics.occupancy("local", sum(row.size_bytes for row in local), len(local))
        self._metrics.occupancy("remote", sum(row.size_bytes for row in remote), len(remote))
        self._metrics.dirty_checkpoints.set(await self._registry.dirty_count())

    # -- remove ---------------------------------------------------------------------

    async def remove(self, reference: str, *, remote: bool) -> Removal:
        """Remove a checkpoint's local copy (and its remote one with `remote`); the row
        goes once no copy is left. FailedPrecondition while it is in use or being taken."""
        row = await self._registry.lookup(reference)
        if row.state is CheckpointState.STAGING:
            raise FailedPrecondition(f"checkpoint {row.qualified_name} ({row.id}) is being taken; remove it"
                                     " once it committed or failed")
        self._inuse.check_free(row.id, f"removal of {row.qualified_name}")
        uploaded = row.state is CheckpointState.COMMITTED and row.tier is Tier.REMOTE
        has_local = self._local.has(row.id)
        if row.state is CheckpointState.COMMITTED and not has_local and uploaded and not remote:
            raise FailedPrecondition(f"checkpoint {row.qualified_name} ({row.id}) is only in the remote tier:"
                                     " remove it there with --remote")
        if remote and uploaded and self._remote is None:
            raise FailedPrecondition(f"checkpoint {row.qualified_name} ({row.id}) has a remote copy, but no"
                                     " remote tier is configured")
        scope = retention.Scope.ALL if (remote or not uploaded) else retention.Scope.LOCAL
        return await self._remove(row, scope, uploaded=uploaded)

    async def _remove(self, row: CheckpointRow, scope: retention.Scope, *, uploaded: bool) -> Removal:
        freed_local = freed_remote = 0
        removed_local = removed_remote = False
        if scope in (retention.Scope.LOCAL, retention.Scope.ALL) and self._local.has(row.id):
            freed_local = await asyncio.to_thread(self._local.size_bytes, row.id)
            removed_local = await asyncio.to_thread(self._local.remove, row.id)
            self._metrics.collected("local")
        if scope in (retention.Scope.REMOTE, retention.Scope.ALL) and uploaded and self._remote is not None:
            freed_remote = await asyncio.to_thread(self._remote.delete, row.id, namespace=row.namespace,
                                                   name=row.name, node=self._config.node_name)
            removed_remote = True
            self._metrics.collected("remote")
        if scope is retention.Scope.ALL or (removed_local and not uploaded):
            await self._registry.delete(row.id)
        elif removed_remote:
            await self._registry.mark_remote_removed(row.id)
        log.info("checkpoint %s (%s): removed %s%s", row.id, row.qualified_name,
                 "the local copy" if removed_local else "no local copy",
                 ", the remote copy" if removed_remote else "")
        await self.refresh_occupancy()
        return Removal(row, removed_local, removed_remote, freed_local, freed_remote)

    # -- collect ----------------------------------------------------------------------

    async def collect(self, *, dry_run: bool = False) -> Collection:
        """Apply the retention policy once."""
        async with self._collecting:
            rows = await self._registry.all(CheckpointState.COMMITTED)
            candidates = []
            for row in rows:
                shares = await self._registry.shares(row.id)
                configured = [c for c in self._config.restore_shares
                              if c.applies_to(row.id, row.qualified_name)]
                candidates.append(retention.Candidate(
                    row=row, local=self._local.has(row.id), uploaded=row.tier is Tier.REMOTE,
                    in_use=bool(self._inuse.users(row.id)), shared=bool(shares or configured)))
            plan = retention.plan(self._config.retention, candidates, now=datetime.now(UTC),
                                  remote_configured=self._remote is not None)
            by_id = {row.id: row for row in rows}
            collected: list[tuple[CheckpointRow, retention.Decision]] = []
            kept = list(plan.kept)
            freed_local = freed_remote = 0
            for decision in plan.decisions:
                row = by_id[decision.checkpoint_id]
                if dry_run:
                    collected.append((row, decision))
                    continue
                if self._inuse.users(row.id):  # taken into use since the plan was made
                    kept.append(f"{row.qualified_name} ({row.id}): {decision.reason}, but in use")
                    continue
                try:
                    removal = await self._remove(row, decision.scope, uploaded=row.tier is Tier.REMOTE)
                except KybernateError as exc:
                    log.warning("retention: checkpoint %s stays: %s", row.id, exc)
                    kept.append(f"{row.qualified_name} ({row.id}): {decision.reason}, but removing it failed: {exc}")
                    continue
                log.info("retention: checkpoint %s (%s), %s: %s", row.id, row.qualified_name,
                         decision.scope.value, decision.reason)
                collected.append((row, decision))
                freed_local += removal.freed_local_bytes
                freed_remote += removal.freed_remote_bytes
            return Collection(collected, kept, freed_local, freed_remote)

    # -- promote, fetch, verify ---------------------------------------------------------------

    async def promote(self, reference: str, meter: TransferMeter) -> CheckpointRow:
        """Upload a committed local checkpoint now (nothing to do when it is uploaded)."""
        row = await self._registry.lookup(reference)
        if self._promoter is None or self._remote is None:
            raise FailedPrecondition("promote: no remote tier is configured ([s3] in the agent's configuration)")
        if row.state is not CheckpointState.COMMITTED:
            raise FailedPrecondition(f"checkpoint {row.qualified_name} ({row.id}) is {row.state.value}, not committed")
        if row.tier is Tier.REMOTE:
            return row
        if not self._local.has(row.id):
            raise NotFound(f"checkpoint {row.qualified_name} ({row.id}) has no local copy to upload")
        if not row.dirty:  # its remote copy was removed: upload it again
            await self._registry.mark_dirty(row.id)
        with self._inuse.using(row.id, "upload"):
            started = asyncio.get_running_loop().time()
            uploaded = await self._promoter.promote(
                row.id, progress=meter.add, on_attempt=lambda: meter.begin("uploading", row.size_bytes))
            if not uploaded:
                why = self._promoter.last_errors.get(row.id, "see the agent's log")
                raise Unavailable(f"upload of checkpoint {row.qualified_name} ({row.id}) to {self._remote.url}"
                                  f" failed; it stays dirty and the promoter retries later: {why}")
            self._metrics.data_moved("upload", row.size_bytes, asyncio.get_running_loop().time() - started)
        await self.refresh_occupancy()
        return await self._registry.get(row.id)

    async def fetch(self, reference: str, requester: Party, meter: TransferMeter) -> CheckpointRow:
        """Bring a checkpoint `requester` may restore into the local tier."""
        user = f"fetch for {requester}"
        started = asyncio.get_running_loop().time()
        meter.begin("downloading", 0)
        try:
            located = await self._preparer.locate(reference, requester, holder=(self._inuse, user, 3600.0),
                                                  progress=meter.add, on_total=meter.set_total)
        finally:
            self._inuse.release(user)
        if located.verified is not None:
            self._metrics.data_moved("download", located.row.size_bytes,
                                     asyncio.get_running_loop().time() - started)
        await self.refresh_occupancy()
        return await self._registry.get(located.row.id)

    async def verify(self, reference: str, meter: TransferMeter) -> CheckpointRow:
        """Check every file of a local checkpoint against its metadata."""
        row = await self._registry.lookup(reference)
        if not self._local.has(row.id):
            raise NotFound(f"checkpoint {row.qualified_name} ({row.id}) has no local copy to verify")
        meter.begin("verifying", row.size_bytes)
        started = asyncio.get_running_loop().time()
        with self._inuse.using(row.id, "verification"):
            await asyncio.to_thread(commit.verify, self._local.committed(row.id), progress=meter.add)
        self._metrics.data_moved("verify", row.size_bytes, asyncio.get_running_loop().time() - started)
        return row
