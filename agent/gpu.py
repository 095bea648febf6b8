"""The agent's view of a container's GPU state, over kybernate.cuda's coordinator.

One place decides what "the container's CUDA processes" are (the CUDA processes in
the init process's cgroup), so Pause, Checkpoint and restore agree. Every step of
the coordinator reads the driver state first, so calling one on processes already
in the target state is harmless.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from kybernate.cuda import (
    CudaBackend,
    CudaCoordinator,
    CudaState,
    find_cuda_pids,
    load_backend,
    report_to_json,
)
from kybernate.cuda.backend import gpu_uuid_bytes
from kybernate.errors import InvalidArgument
from kybernate.runtime.cgroups import Cgroup


class GpuControl:
    """Owns the CUDA backend and coordinator for the agent's lifetime."""

    def __init__(self, backend_name: str, fake_dir: str | None, *,
                 backend: CudaBackend | None = None) -> None:
        """The backend called `backend_name`, or `backend` itself where one is given
        (benchmarks and GPU tests that built it already)."""
        self.backend = backend if backend is not None else load_backend(backend_name,
                                                                        fake_dir=fake_dir)
        self.coordinator = CudaCoordinator(self.backend)

    @property
    def backend_name(self) -> str:
        return str(getattr(self.backend, "name", type(self.backend).__name__))

    async def cuda_pids(self, pids: list[int]) -> list[int]:
        # Reads /proc and may ask the driver: keep it off the event loop.
        found = await asyncio.to_thread(find_cuda_pids, pids, self.backend)
        return sorted(int(p) for p in found)

    async def container_cuda_pids(self, init_pid: int) -> list[int]:
        pids = await asyncio.to_thread(lambda: list(Cgroup.for_pid(init_pid).pids()))
        return await self.cuda_pids(pids)

    async def lock(self, pids: list[int], timeout_ms: int) -> dict[str, Any]:
        return report_to_json(await self.coordinator.lock_all(pids, timeout_ms)) if pids else {}

    async def checkpoint(self, pids: list[int]) -> dict[str, Any]:
        return report_to_json(await self.coordinator.checkpoint_all(pids)) if pids else {}

    async def restore(self, pids: list[int], gpu_map: Mapping[str, str] | None = None) -> dict[str, Any]:
        if not pids:
            return {}
        return report_to_json(await self.coordinator.restore_all(pids, gpu_map=dict(gpu_map or {}) or None))

    async def unlock(self, pids: list[int]) -> dict[str, Any]:
        return report_to_json(await self.coordinator.unlock_all(pids)) if pids else {}

    async def states(self, pids: list[int]) -> dict[int, CudaState]:
        """The driver's checkpoint state of each process."""
        return {pid: await asyncio.to_thread(self.backend.get_state, pid) for pid in pids}

    async def gpus_of(self, pids: list[int]) -> dict[str, int]:
        """GPU UUID -> bytes the given processes hold there."""
        usage: dict[str, int] = {}
        for pid in pids:
            for uuid, size in (await asyncio.to_thread(self.backend.process_gpu_memory, pid)).items():
                usage[uuid] = usage.get(uuid, 0) + int(size)
        return usage

    async def inventory(self, pids: list[int]) -> dict[str, Any]:
        return dict(await self.coordinator.snapshot_inventory(pids)) if pids else {"gpus": []}

    async def driver_version(self) -> str:
        version = getattr(self.backend, "driver_version", None)
        if callable(version):
            return str(await asyncio.to_thread(version))
        return str(version or "")

    async def restore_fit(self, metadata: Mapping[str, Any]) -> dict[str, str]:
        """GPU map for restoring a checkpoint on this node: empty when every checkpointed
        GPU is here with room (the driver restores in place), else one entry for every
        GPU the checkpoint covers (the driver refuses a partial map). ResourceExhausted
        naming need and free memory per GPU when it does not fit."""
        required, models = checkpointed_gpus(metadata)
        if not required:
            return {}
        return await asyncio.to_thread(self.coordinator.check_restore_fit, required, models)


def checkpointed_gpus(metadata: Mapping[str, Any]) -> tuple[dict[str, int], dict[str, str]]:
    """The checkpoint's GPUs (UUID -> bytes the container held there, UUID -> model) from
    metadata.json, which may come from a bucket: every field is checked first."""
    cuda = metadata.get("cuda", {})
    gpus = cuda.get("gpus", []) if isinstance(cuda, Mapping) else None
    if not isinstance(gpus, list):
        raise InvalidArgument("checkpoint metadata: cuda.gpus is not a list")
    required: dict[str, int] = {}
    models: dict[str, str] = {}
    for entry in gpus:
        if not isinstance(entry, Mapping):
            raise InvalidArgument(f"checkpoint metadata: a GPU entry is not an object: {entry!r}")
        uuid, model = entry.get("uuid"), entry.get("model")
        used = entry.get("memory_used_by_container", 0)
        if not isinstance(uuid, str):
            raise InvalidArgument(f"checkpoint metadata: GPU uuid {uuid!r} is not a string")
        gpu_uuid_bytes(uuid)  # InvalidArgument unless it is one
        if not isinstance(model, str) or not model or len(model) > 256:
            raise InvalidArgument(f"checkpoint metadata: GPU {uuid} has no usable model: {model!r}")
        if isinstance(used, bool) or not isinstance(used, int) or not 0 <= used < 1 << 50:
            raise InvalidArgument(f"checkpoint metadata: GPU {uuid} memory {used!r} is not bytes")
        if uuid in required:
            raise InvalidArgument(f"checkpoint metadata: GPU {uuid} is listed twice")
        required[uuid], models[uuid] = used, model
    return required, models
