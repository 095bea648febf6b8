"""DriverApiBackend on a real GPU, with bench/gpu_workload.py (cuda-bindings only) as the
process under test: locked, checkpointed (NVML shows its GPU memory released),
restored with the map the agent really sends, unlocked, and its checksum intact.
Skipped, with the reason printed, where there is no NVIDIA GPU or driver.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from bench.gpu_workload import Workload
from tests.support.fake_libcuda import real_bindings

SIZE = 1 << 30

pytestmark = pytest.mark.gpu


def _missing_gpu_stack() -> str | None:
    if not os.path.exists("/dev/nvidiactl"):
        return "no NVIDIA GPU here (/dev/nvidiactl is absent)"
    try:
        # NVIDIA's `cuda` namespace, not the repository's cuda/ folder on pytest's path.
        real_bindings()
    except ImportError as err:
        return f"cuda-bindings is not installed ({err})"
    if importlib.util.find_spec("pynvml") is None:
        return "nvidia-ml-py is not installed (pynvml does not import)"
    return None


_REASON = _missing_gpu_stack()
if _REASON is not None:
    print(f"tests/gpu skipped: {_REASON}", file=sys.stderr)
    pytest.skip(_REASON, allow_module_level=True)

from kybernate.agent.gpu import GpuControl
from kybernate.cuda import CudaState, find_cuda_pids
from kybernate.cuda.driver import DriverApiBackend
from kybernate.errors import FailedPrecondition


@pytest.fixture(scope="module")
def backend() -> Iterator[DriverApiBackend]:
    try:
        driver_backend = DriverApiBackend()
    except FailedPrecondition as err:  # a device node but no usable driver
        print(f"tests/gpu skipped: {err}", file=sys.stderr)
        pytest.skip(str(err))
    try:
        yield driver_backend
    finally:
        driver_backend.close()


@pytest.fixture
def worker() -> Iterator[Workload]:
    with Workload(SIZE) as handle:
        assert handle.ready["intact"], handle.ready
        yield handle


def test_round_trip_keeps_the_data_and_releases_the_gpu(
        backend: DriverApiBackend, worker: Workload) -> None:
    assert backend.get_state(worker.pid) is CudaState.RUNNING
    held = backend.process_gpu_memory(worker.pid)
    assert sum(held.values()) >= SIZE, held
    gpu_uuid = worker.ready["device_uuid"]
    assert gpu_uuid in backend.process_gpus(worker.pid)
    free_before = next(g.memory_free for g in backend.gpus() if g.uuid == gpu_uuid)

    backend.lock(worker.pid, 10_000)
    assert backend.get_state(worker.pid) is CudaState.LOCKED
    backend.checkpoint(worker.pid)
    assert backend.get_state(worker.pid) is CudaState.CHECKPOINTED
    assert sum(backend.process_gpu_memory(worker.pid).values()) == 0
    free_checkpointed = next(g.memory_free for g in backend.gpus() if g.uuid == gpu_uuid)
    assert free_checkpointed - free_before >= SIZE
    assert backend.restore_thread_id(worker.pid) > 0

    backend.restore(worker.pid)
    assert backend.get_state(worker.pid) is CudaState.LOCKED
    backend.unlock(worker.pid)
    assert backend.get_state(worker.pid) is CudaState.RUNNING
    check = worker.ask("check")
    assert check["intact"] and check["checksum"] == worker.checksum, check


def test_the_agents_map_and_discovery_on_the_gpu(backend: DriverApiBackend,
                                                 worker: Workload) -> None:
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        assert find_cuda_pids([bystander.pid, worker.pid], backend) == [worker.pid]
    finally:
        bystander.kill()
        bystander.wait()
    control = GpuControl("driver", None, backend=backend)  # the agent's GPU half
    coordinator = control.coordinator

    async def cycle() -> dict[str, str]:
        await coordinator.lock_all([worker.pid], 10_000)
        inventory = await coordinator.snapshot_inventory([worker.pid])
        assert sum(g["memory_used_by_container"] for g in inventory["gpus"]) >= SIZE
        checkpointed = await coordinator.checkpoint_all([worker.pid])
        assert checkpointed[worker.pid].gpu_memory_bytes >= SIZE
        # The checkpointed process has left NVML's list but is still found.
        assert find_cuda_pids([worker.pid], backend) == [worker.pid]
        gpu_map = await control.restore_fit({"cuda": inventory})
        await coordinator.restore_all([worker.pid], gpu_map)
        await coordinator.unlock_all([worker.pid])
        return gpu_map

    gpu_map = asyncio.run(cycle())
    assert gpu_map == {}, "every GPU is still here: the agent sends no map"
    check = worker.ask("check")
    assert check["intact"] and check["checksum"] == worker.checksum, check


def test_restore_onto_the_other_gpu_with_a_complete_map(backend: DriverApiBackend) -> None:
    gpus = backend.gpus()
    if len(gpus) < 2 or gpus[0].model != gpus[1].model:
        pytest.skip(f"needs two GPUs of one model, this node has {[g.model for g in gpus]}")
    if not backend.support.remap:
        pytest.skip(backend.support.remap_refusal)
    with Workload(SIZE, device=gpus[0].uuid) as work:
        covered = backend.process_gpus(work.pid)
        backend.lock(work.pid, 10_000)
        backend.checkpoint(work.pid)
        # Every GPU the process covers is named; the two first swap places.
        swap = {gpus[0].uuid: gpus[1].uuid, gpus[1].uuid: gpus[0].uuid}
        gpu_map = {uuid: swap.get(uuid, uuid) for uuid in covered}
        backend.restore(work.pid, gpu_map)
        backend.unlock(work.pid)
        assert backend.process_gpu_memory(work.pid).keys() == {gpus[1].uuid}
        check = work.ask("check")
        assert check["intact"] and check["checksum"] == work.checksum, check
