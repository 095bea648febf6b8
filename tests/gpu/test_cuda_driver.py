"""DriverApiBackend on a real GPU: a process holding a tensor of known checksum is
locked, checkpointed (NVML shows its GPU memory released), restored and unlocked, and
recomputes the same checksum. Skipped, with the reason, where no NVIDIA GPU is present.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "gpu_roundtrip.py"
TENSOR_BYTES = 1 << 30

pytestmark = pytest.mark.gpu


def _missing_gpu_stack() -> str | None:
    if not os.path.exists("/dev/nvidiactl"):
        return "no NVIDIA GPU here (/dev/nvidiactl is absent)"
    for module, package in (("cuda.bindings", "cuda-bindings"), ("pynvml", "nvidia-ml-py"),
                            ("torch", "PyTorch")):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return f"{package} is not installed ({module} does not import)"
    return None


_REASON = _missing_gpu_stack()
if _REASON is not None:
    print(f"tests/gpu skipped: {_REASON}", file=sys.stderr)
    pytest.skip(_REASON, allow_module_level=True)

sys.path.insert(0, str(BENCH.parent))
from gpu_roundtrip import Worker, ensure_kybernate_importable, round_trip

ensure_kybernate_importable()

from kybernate.cuda import CudaCoordinator, CudaState, find_cuda_pids
from kybernate.cuda.driver import DriverApiBackend


@pytest.fixture(scope="module")
def backend() -> Iterator[DriverApiBackend]:
    driver_backend = DriverApiBackend()
    try:
        yield driver_backend
    finally:
        driver_backend.close()


@pytest.fixture
def worker() -> Iterator[Worker]:
    handle = Worker(TENSOR_BYTES)
    try:
        yield handle
    finally:
        handle.close()


def test_round_trip_keeps_the_tensor_and_releases_the_gpu(
        backend: DriverApiBackend, worker: Worker) -> None:
    assert backend.get_state(worker.pid) is CudaState.RUNNING
    held = backend.process_gpu_memory(worker.pid)
    assert sum(held.values()) >= TENSOR_BYTES, held
    gpu_uuid = next(iter(held))
    free_before = next(g.memory_free for g in backend.gpus() if g.uuid == gpu_uuid)

    backend.lock(worker.pid, 10_000)
    assert backend.get_state(worker.pid) is CudaState.LOCKED
    backend.checkpoint(worker.pid)
    assert backend.get_state(worker.pid) is CudaState.CHECKPOINTED
    assert sum(backend.process_gpu_memory(worker.pid).values()) == 0
    free_checkpointed = next(g.memory_free for g in backend.gpus() if g.uuid == gpu_uuid)
    assert free_checkpointed - free_before >= TENSOR_BYTES
    assert backend.restore_thread_id(worker.pid) > 0

    backend.restore(worker.pid)
    assert backend.get_state(worker.pid) is CudaState.LOCKED
    backend.unlock(worker.pid)
    assert backend.get_state(worker.pid) is CudaState.RUNNING
    assert worker.check() == worker.checksum


def test_coordinator_and_discovery_on_the_gpu(backend: DriverApiBackend, worker: Worker) -> None:
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        assert find_cuda_pids([bystander.pid, worker.pid], backend) == [worker.pid]
    finally:
        bystander.kill()
        bystander.wait()
    coordinator = CudaCoordinator(backend)

    async def cycle() -> None:
        inventory = await coordinator.snapshot_inventory([worker.pid])
        assert sum(g["memory_used_by_container"] for g in inventory["gpus"]) >= TENSOR_BYTES
        await coordinator.lock_all([worker.pid], 10_000)
        checkpointed = await coordinator.checkpoint_all([worker.pid])
        assert checkpointed[worker.pid].gpu_memory_bytes >= TENSOR_BYTES
        # The checkpointed process has left NVML's list but is still found.
        assert find_cuda_pids([worker.pid], backend) == [worker.pid]
        await coordinator.restore_all([worker.pid])
        await coordinator.unlock_all([worker.pid])

    asyncio.run(cycle())
    assert worker.check() == worker.checksum


def test_restore_with_an_identity_gpu_map(backend: DriverApiBackend, worker: Worker) -> None:
    from cuda.bindings import driver

    if not hasattr(driver, "CUcheckpointGpuPair"):
        pytest.skip("cuda-bindings has no CUcheckpointGpuPair (GPU remapping needs CUDA 13)")
    # The driver wants a pair for every GPU it sees; identity pairs exercise the path.
    gpu_map = {gpu.uuid: gpu.uuid for gpu in backend.gpus()}
    result = round_trip(backend, worker, gpu_map)
    assert result["released"] and result["intact"], result
    assert result["state_after"] == "RUNNING"
