"""The agent's half of a restore: before `runc restore` (authorize, fetch, verify, GPU
fit) and after it (CUDA restore and unlock of the restored processes).

Three sources, three levels of trust:
- containerd's own checkpoint directory (CreateTaskRequest.checkpoint): containerd
  unpacked it from its content store for a client of that namespace; verified (runc's
  images, without metadata.json, by `foreign_checkpoint`);
- a host directory an annotation named: only under the configured roots; verified;
- a registry checkpoint (id, name, or namespace/name): only one the restoring
  namespace took or was given by a share, checked before a byte of it is read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kybernate.agent import access, commit, naming
from kybernate.agent.access import ConfiguredShare, Party
from kybernate.agent.fetch import Fetcher
from kybernate.agent.foreign_checkpoint import verify_foreign
from kybernate.agent.gpu import GpuControl
from kybernate.agent.inuse import InUse
from kybernate.agent.local_tier import LocalTier
from kybernate.agent.registry import CheckpointRow, CheckpointState, Registry, Tier, split_reference
from kybernate.agent.remote import RemoteTier
from kybernate.agent.verification import PendingVerifications, deferrable
from kybernate.api import layout
from kybernate.api.layout import METADATA_FILE
from kybernate.errors import DataLoss, FailedPrecondition, InvalidArgument, KybernateError, NotFound

log = logging.getLogger(__name__)

#: How long a restore from containerd's copy waits for the local commit of the same
#: checkpoint (its fsync) before it hashes containerd's copy instead.
LOCAL_COMMIT_WAIT_S = 30.0


@dataclasses.dataclass(frozen=True)
class PreparedRestore:
    image_dir: Path
    metadata: dict[str, Any]
    gpu_map: dict[str, str]
    checkpoint_id: str
    # Files still being hashed (defer_pages), and the id to await them by.
    verification_id: str = ""
    deferred_files: tuple[str, ...] = ()
    lazy_pages: bool = False


@dataclasses.dataclass(frozen=True)
class Located:
    row: CheckpointRow
    directory: Path
    # Set when it was downloaded (and so verified) just now.
    verified: dict[str, Any] | None


class RestorePreparer:
    def __init__(self, registry: Registry, local: LocalTier, remote: RemoteTier | None,
                 gpu: GpuControl, criu_version: str, *, allowed_roots: Sequence[Path] = (),
                 forbidden_roots: Sequence[Path] = (), shares: Sequence[ConfiguredShare] = (),
                 fetcher: Fetcher | None = None, lazy_pages: bool = False) -> None:
        self._registry = registry
        self._local = local
        self._remote = remote
        # One download per checkpoint however many restores ask for it at once.
        self._fetcher = fetcher or (Fetcher(remote, local, criu_version=criu_version) if remote is not None else None)
        self._gpu = gpu
        self._criu_version = criu_version
        self._allowed_roots = tuple(allowed_roots)
        self._forbidden_roots = tuple(forbidden_roots)
        self._configured_shares = tuple(shares)
        self.verifications = PendingVerifications()
        self._lazy_pages = lazy_pages

    def lazy(self, asked: bool | None) -> bool:
        """Whether a restore uses lazy pages: the container's choice, else the node's."""
        return self._lazy_pages if asked is None else asked

    async def from_containerd(self, directory: Path, requester: Party | None = None, *,
                              defer_pages: bool = False,
                              holder: tuple[InUse, str, float] | None = None) -> PreparedRestore:
        """containerd's unpacked checkpoint (its content store already decided who may
        read it). When it is a copy of a checkpoint this node committed and sealed,
        and the requester may restore that one, the sealed local copy is restored
        instead: the same bytes, already verified, where containerd's copy would have
        to be hashed in full."""
        if not directory.is_absolute():
            raise InvalidArgument(f"restore: checkpoint directory {directory} must be absolute")
        if not (directory / METADATA_FILE).exists():
            # runc's images (kubelet's forensic checkpoint of a runc pod): only from
            # containerd, and only once they pass foreign_checkpoint's checks.
            metadata = await asyncio.to_thread(verify_foreign, directory)
            return await self._fit(directory, metadata)
        if requester is not None:
            local = await self._sealed_local_copy(directory, requester, defer_pages, holder)
            if local is not None:
                return local
        return await self._verified(directory, defer_pages=defer_pages)

    async def _sealed_local_copy(self, directory: Path, requester: Party, defer_pages: bool,
                                 holder: tuple[InUse, str, float] | None) -> PreparedRestore | None:
        try:
            offered = await asyncio.to_thread(commit.read_metadata, directory)
        except KybernateError:
            return None  # verification of containerd's copy says what is wrong with it
        checkpoint_id = str(offered.get("id", ""))
        if not naming.is_checkpoint_id(checkpoint_id):
            return None
        if defer_pages and self._local.in_flight.running(checkpoint_id):
            # Its Checkpoint call returned before its commit (fsync, seal) ended: the
            # disk is busy with it, and containerd's copy, hashed while CRIU restores,
            # costs the restore less than waiting for it.
            return None
        try:
            async with asyncio.timeout(LOCAL_COMMIT_WAIT_S):
                await self._local.in_flight.wait(checkpoint_id)
        except TimeoutError:
            return None
        if not self._local.has(checkpoint_id):
            return None
        try:
            row = await self._registry.get(checkpoint_id)
            shares = [*await self._registry.shares(row.id), *self._shares_of(row.id, row.qualified_name)]
            access.check_restore(f"checkpoint {checkpoint_id}", row.owner, requester, shares)
        except KybernateError:
            return None  # not the requester's to take from here: containerd's copy is
        if holder is not None:  # in use from here: nothing removes it under the restore
            inuse, user, ttl_s = holder
            inuse.hold(checkpoint_id, user, ttl_s)
        local_dir = self._local.committed(checkpoint_id)
        sealed = await asyncio.to_thread(self._local.seals.matching, checkpoint_id, local_dir)
        try:
            local_metadata = await asyncio.to_thread(commit.read_metadata, local_dir)
        except KybernateError:
            return None
        if not sealed or local_metadata.get("files") != offered.get("files"):
            return None
        log.info("restore: %s is a copy of checkpoint %s, sealed in the local tier; restoring that",
                 directory, checkpoint_id)
        return await self._verified(local_dir, local_id=checkpoint_id, defer_pages=defer_pages)

    async def from_host_directory(self, directory: Path, *, defer_pages: bool = False) -> PreparedRestore:
        real = access.allowed_directory(directory, self._allowed_roots, forbidden=self._forbidden_roots)
        return await self._verified(real, defer_pages=defer_pages)

    async def from_registry(self, reference: str, requester: Party, *,
                            holder: tuple[InUse, str, float] | None = None,
                            defer_pages: bool = False) -> PreparedRestore:
        """A registry checkpoint `requester` may restore, fetched if need be, verified
        (a local copy through its seals, see `_verified`). `holder` (in-use tracker,
        user, seconds) marks it in use from the moment it is known until the caller
        releases it, or the seconds pass."""
        located = await self.locate(reference, requester, holder=holder)
        if located.verified is not None:  # downloaded and verified (and sealed) just now
            return await self._fit(located.directory, located.verified)
        prepared = await self._verified(located.directory, local_id=located.row.id, defer_pages=defer_pages)
        if prepared.checkpoint_id != located.row.id or Party.of_metadata(prepared.metadata) != located.row.owner:
            raise DataLoss(f"checkpoint {located.row.id}: {located.directory} holds another checkpoint"
                           f" ({prepared.checkpoint_id or 'no id'}); refusing it")
        return prepared

    async def locate(self, reference: str, requester: Party, *,
                     holder: tuple[InUse, str, float] | None = None,
                     progress: Callable[[int], None] | None = None,
                     on_total: Callable[[int], None] | None = None) -> Located:
        """A registry checkpoint `requester` may restore, in the local tier: downloaded
        (and verified) if it was only in the remote tier. Refused before a byte of it
        is read when `requester` may not restore it."""
        try:
            row = await self._registry.lookup(reference, requester.namespace)
        except InvalidArgument as exc:
            raise exc.with_message(f"restore of checkpoint {reference[:80]!r} refused: {exc}") from None
        except NotFound:
            if self._remote is None:
                raise NotFound(f"checkpoint {reference!r} is not in the registry of {requester}, and no"
                               " remote tier is configured") from None
            return await self._from_remote(reference, requester, holder, progress, on_total)
        row = await self._committed(row)
        shares = [*await self._registry.shares(row.id), *self._shares_of(row.id, row.qualified_name)]
        access.check_restore(f"checkpoint {reference!r}", row.owner, requester, shares)
        if holder is not None:
            inuse, user, ttl_s = holder
            inuse.hold(row.id, user, ttl_s)
        if self._local.has(row.id):
            return Located(row, self._local.committed(row.id), None)
        if self._fetcher is None:
            raise NotFound(f"checkpoint {reference!r} is not in the local tier and no remote tier is configured")
        directory = await self._fetcher.fetch(row.id, progress=progress, on_total=on_total)
        return Located(row, directory, await asyncio.to_thread(commit.read_metadata, directory))

    async def _committed(self, row: CheckpointRow) -> CheckpointRow:
        """The row, committed: a commit still running (the Checkpoint call returned
        at EXPORTED) is waited for, and a registry that lags behind the disk (the
        agent stopped between the rename and the row's update) is brought up to date."""
        if row.state is CheckpointState.STAGING and await self._local.in_flight.wait(row.id):
            row = await self._registry.get(row.id)
        if row.state is CheckpointState.COMMITTED:
            return row
        if self._local.has(row.id):
            try:
                metadata = await asyncio.to_thread(commit.verify, self._local.committed(row.id))
            except KybernateError as exc:
                log.warning("checkpoint %s: committed directory does not verify: %s", row.id, exc)
            else:
                await self._registry.mark_committed(
                    row.id, size_bytes=sum(f["size"] for f in metadata["files"].values()),
                    file_count=len(metadata["files"]),
                    checksums={k: v["sha256"] for k, v in metadata["files"].items()}, dirty=row.dirty)
                return await self._registry.get(row.id)
        raise FailedPrecondition(f"checkpoint {row.qualified_name} ({row.id}) is {row.state.value}, not"
                                 " committed" + (f": {row.error}" if row.error else ""))

    async def _from_remote(self, reference: str, requester: Party, holder: tuple[InUse, str, float] | None,
                           progress: Callable[[int], None] | None,
                           on_total: Callable[[int], None] | None) -> Located:
        """Another node's checkpoint (migration), found through the bucket's name index."""
        assert self._remote is not None and self._fetcher is not None
        where = split_reference(reference, requester.namespace)
        if isinstance(where, str):
            checkpoint_id = where
        else:
            namespace, name = where
            if namespace != requester.namespace and not any(
                    c.checkpoint == f"{namespace}/{name}" and c.share.admits(requester)
                    for c in self._configured_shares):
                # Not ours, and no configured share names it: nothing is downloaded.
                raise access.refusal(f"checkpoint {reference!r}", Party(namespace), requester)
            entry = await asyncio.to_thread(self._remote.resolve_name, namespace, name)
            checkpoint_id = naming.checkpoint_id(entry.checkpoint_id)
        if holder is not None:
            inuse, user, ttl_s = holder
            inuse.hold(checkpoint_id, user, ttl_s)
        # The fetch verifies every file (commit.verify) before it renames into place.
        directory = await self._fetcher.fetch(checkpoint_id, progress=progress, on_total=on_total)
        metadata = await asyncio.to_thread(commit.read_metadata, directory)
        row = CheckpointRow.from_metadata(metadata, tier=Tier.REMOTE, dirty=False)
        try:
            access.check_restore(f"checkpoint {reference!r}", row.owner, requester,
                                 self._shares_of(row.id, row.qualified_name))
        except KybernateError:
            # Not ours to keep: nothing of it stays on this node.
            await asyncio.to_thread(shutil.rmtree, directory, True)
            raise
        recorded = await self._registry.add_committed(row)
        return Located(recorded, directory, metadata)

    def _shares_of(self, checkpoint_id: str, qualified_name: str) -> list[access.Share]:
        return access.configured_shares(self._configured_shares, checkpoint_id, qualified_name)

    async def _verified(self, directory: Path, *, local_id: str | None = None,
                        defer_pages: bool = False) -> PreparedRestore:
        """Verify `directory`; a checkpoint of the local tier (`local_id`) is hashed
        only where its seal no longer matches, and sealed again once it verified.
        With `defer_pages` the pages images that need a hash are hashed in the
        background (see `kybernate.agent.verification`) after everything else."""
        sealed = (await asyncio.to_thread(self._local.seals.matching, local_id, directory)
                  if local_id is not None else frozenset())
        deferred: set[str] = set()
        if defer_pages:
            listed = (await asyncio.to_thread(commit.read_metadata, directory))["files"]
            deferred = deferrable(listed) - sealed
        metadata = await asyncio.to_thread(commit.verify, directory, criu_version=self._criu_version,
                                           trusted=sealed, deferred=deferred)
        every = {*metadata["files"], layout.METADATA_FILE}
        reseal = local_id is not None and not every <= sealed

        def seal_again() -> None:
            assert local_id is not None
            try:
                self._local.seals.record(local_id, directory, every)
            except OSError as exc:
                log.warning("checkpoint %s verified, but sealing it failed: %s", local_id, exc)

        verification_id = ""
        if deferred:
            expected = {rel: metadata["files"][rel]["sha256"] for rel in deferred}
            verification_id = self.verifications.start(directory, expected, seal_again if reseal else None)
        elif reseal:
            await asyncio.to_thread(seal_again)
        prepared = await self._fit(directory, metadata)
        return dataclasses.replace(prepared, verification_id=verification_id, deferred_files=tuple(sorted(deferred)))

    async def _fit(self, directory: Path, metadata: dict[str, Any]) -> PreparedRestore:
        gpu_map = await self._gpu.restore_fit(metadata)
        return PreparedRestore(image_dir=directory, metadata=metadata, gpu_map=gpu_map,
                               checkpoint_id=str(metadata.get("id", "")))


def metadata_json(metadata: Mapping[str, Any]) -> str:
    return json.dumps(metadata, sort_keys=True)


async def complete_restore(gpu: GpuControl, init_pid: int, gpu_map: Mapping[str, str]) -> list[int]:
    """CUDA restore, then unlock, for every CUDA process of the restored container."""
    if init_pid <= 0:
        raise InvalidArgument("complete restore: init_pid is required")
    pids = await gpu.container_cuda_pids(init_pid)
    await gpu.restore(pids, gpu_map)
    await gpu.unlock(pids)
    return pids
