"""The agent's half of a restore: before `runc restore` (fetch, verify, GPU fit) and
after it (CUDA restore and unlock of the restored processes)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from kybernate.agent import commit, naming
from kybernate.agent.fetch import Fetcher
from kybernate.agent.gpu import GpuControl
from kybernate.agent.registry import CheckpointRow, CheckpointState, Registry, Tier
from kybernate.agent.remote import RemoteTier
from kybernate.agent.storage import LocalTier
from kybernate.errors import FailedPrecondition, InvalidArgument, NotFound


@dataclasses.dataclass(frozen=True)
class PreparedRestore:
    image_dir: Path
    metadata: dict[str, Any]
    gpu_map: dict[str, str]
    checkpoint_id: str


class RestorePreparer:
    def __init__(self, registry: Registry, local: LocalTier, remote: RemoteTier | None,
                 gpu: GpuControl, criu_version: str) -> None:
        self._registry = registry
        self._local = local
        self._remote = remote
        self._fetcher = Fetcher(remote, local, criu_version=criu_version) if remote is not None else None
        self._gpu = gpu
        self._criu_version = criu_version

    async def from_directory(self, directory: Path) -> PreparedRestore:
        if not directory.is_absolute():
            raise InvalidArgument(f"restore: checkpoint directory {directory} must be absolute")
        metadata = await asyncio.to_thread(commit.verify, directory, criu_version=self._criu_version)
        return await self._fit(directory, metadata)

    async def from_registry(self, id_or_name: str, namespace: str = "") -> PreparedRestore:
        checkpoint_id = await self._resolve(id_or_name, namespace)
        if self._local.has(checkpoint_id):
            directory = self._local.committed(checkpoint_id)
        elif self._fetcher is not None:
            directory = await self._fetcher.fetch(checkpoint_id)
        else:
            raise NotFound(f"checkpoint {id_or_name!r} is not in the local tier and no remote tier is configured")
        metadata = await asyncio.to_thread(commit.verify, directory, criu_version=self._criu_version)
        await self._remember(checkpoint_id, metadata)
        return await self._fit(directory, metadata)

    async def _resolve(self, id_or_name: str, namespace: str) -> str:
        try:
            row = await self._registry.get(id_or_name)
        except NotFound:
            if self._remote is None:
                raise
            # Another node's checkpoint (migration): the bucket's name index knows its
            # name in its namespace; without a namespace it can only be an id.
            if namespace:
                with contextlib.suppress(NotFound):
                    entry = await asyncio.to_thread(self._remote.resolve_name, namespace, id_or_name)
                    return entry.checkpoint_id
            if not naming.is_checkpoint_id(id_or_name):
                raise NotFound(f"checkpoint {id_or_name!r} is not in the registry, nor named so in"
                               f" namespace {namespace!r} of {self._remote.url}") from None
            return id_or_name  # fetch() says whether it exists
        if row.state is not CheckpointState.COMMITTED:
            raise FailedPrecondition(f"checkpoint {id_or_name!r} is {row.state.value}, not committed"
                                     + (f": {row.error}" if row.error else ""))
        return row.id

    async def _remember(self, checkpoint_id: str, metadata: Mapping[str, Any]) -> None:
        """Record a checkpoint fetched from another node's upload in this registry."""
        try:
            await self._registry.get(checkpoint_id)
            return
        except NotFound:
            pass
        files = metadata["files"]
        container = metadata.get("container", {})
        await self._registry.add_committed(CheckpointRow(
            id=checkpoint_id, name=str(metadata.get("name", checkpoint_id)), state=CheckpointState.COMMITTED,
            tier=Tier.REMOTE, dirty=False, size_bytes=sum(f["size"] for f in files.values()),
            file_count=len(files), checksums={k: v["sha256"] for k, v in files.items()},
            container_id=str(container.get("id", "")), namespace=str(container.get("namespace", "")),
            image=str(container.get("image", "")),
            created_at=datetime.fromisoformat(metadata["created_at"]), error=""))

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
