"""DriverApiBackend's calls into cuda-bindings and NVML, checked against a recording
stand-in of those two modules (no GPU or driver can run here; tests/gpu/ runs the real
thing). What this pins down: which driver functions are called with which argument
structs and fields, how CUresult errors become CudaError / CudaLockTimeout, and how
NVML's answers become GpuInfo and per-process usage. The names and shapes follow
cuda-bindings' documented API (cuda.bindings.driver) and nvidia-ml-py (pynvml)."""

from __future__ import annotations

import enum
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from kybernate.cuda import CudaError, CudaLockTimeout, CudaState, find_cuda_pids
from kybernate.cuda.driver import DriverApiBackend
from kybernate.errors import FailedPrecondition, InvalidArgument

GPU_A = "GPU-aaaaaaaa-0000-4000-8000-000000000001"
GPU_B = "GPU-bbbbbbbb-0000-4000-8000-000000000002"


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_NOT_INITIALIZED = 3
    CUDA_ERROR_ILLEGAL_STATE = 401
    CUDA_ERROR_NOT_FOUND = 500
    CUDA_ERROR_TIMEOUT = 909


class CUprocessState(enum.IntEnum):
    CU_PROCESS_STATE_RUNNING = 0
    CU_PROCESS_STATE_LOCKED = 1
    CU_PROCESS_STATE_CHECKPOINTED = 2
    CU_PROCESS_STATE_FAILED = 3


class CUuuid:
    """Like cuda-bindings' CUuuid_st: a char[16] `bytes` field."""

    def __init__(self) -> None:
        self._bytes = b"\0" * 16

    @property
    def bytes(self) -> bytes:
        return self._bytes

    @bytes.setter
    def bytes(self, value: bytes) -> None:
        if len(value) != 16:
            raise ValueError("bytes length must be 16")
        self._bytes = bytes(value)


class Struct:
    """Only the documented fields may be set, as on cuda-bindings' Cython structs."""

    fields: tuple[str, ...] = ()

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self.fields:
            raise AttributeError(f"{type(self).__name__} has no field {name}")
        object.__setattr__(self, name, value)


class CUcheckpointLockArgs(Struct):
    fields = ("timeoutMs", "reserved0", "reserved1")
    timeoutMs: int


class CUcheckpointRestoreArgs(Struct):
    fields = ("gpuPairs", "gpuPairsCount", "reserved", "reserved1")


class CUcheckpointGpuPair(Struct):
    fields = ("oldUuid", "newUuid")


class FakeDriverModule(types.ModuleType):
    """cuda.bindings.driver as far as the backend uses it, recording every call."""

    def __init__(self) -> None:
        super().__init__("cuda.bindings.driver")
        self.CUresult = CUresult
        self.CUprocessState = CUprocessState
        self.CUuuid = CUuuid
        self.CUcheckpointLockArgs = CUcheckpointLockArgs
        self.CUcheckpointRestoreArgs = CUcheckpointRestoreArgs
        self.CUcheckpointGpuPair = CUcheckpointGpuPair
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.states: dict[int, CUprocessState] = {}
        self.fail_next: dict[str, CUresult] = {}

    def _record(self, name: str, *args: Any) -> CUresult | None:
        self.calls.append((name, args))
        return self.fail_next.pop(name, None)

    def cuInit(self, flags: int) -> tuple[CUresult]:
        return (self._record("cuInit", flags) or CUresult.CUDA_SUCCESS,)

    def cuGetErrorName(self, err: CUresult) -> tuple[CUresult, bytes]:
        return CUresult.CUDA_SUCCESS, err.name.encode()

    def cuGetErrorString(self, err: CUresult) -> tuple[CUresult, bytes]:
        return CUresult.CUDA_SUCCESS, f"text of {err.name}".encode()

    def cuCheckpointProcessGetState(self, pid: int) -> tuple[CUresult, Any]:
        err = self._record("cuCheckpointProcessGetState", pid)
        if err is None and pid not in self.states:
            err = CUresult.CUDA_ERROR_NOT_FOUND
        if err:
            return err, None
        return CUresult.CUDA_SUCCESS, self.states[pid]

    def _move(self, name: str, pid: int, args: Any, source: int, target: int
              ) -> tuple[CUresult]:
        err = self._record(name, pid, args)
        if err:
            return (err,)
        if self.states.get(pid) != source:
            return (CUresult.CUDA_ERROR_ILLEGAL_STATE,)
        self.states[pid] = CUprocessState(target)
        return (CUresult.CUDA_SUCCESS,)

    def cuCheckpointProcessLock(self, pid: int, args: Any) -> tuple[CUresult]:
        return self._move("cuCheckpointProcessLock", pid, args, 0, 1)

    def cuCheckpointProcessCheckpoint(self, pid: int, args: Any) -> tuple[CUresult]:
        return self._move("cuCheckpointProcessCheckpoint", pid, args, 1, 2)

    def cuCheckpointProcessRestore(self, pid: int, args: Any) -> tuple[CUresult]:
        return self._move("cuCheckpointProcessRestore", pid, args, 2, 1)

    def cuCheckpointProcessUnlock(self, pid: int, args: Any) -> tuple[CUresult]:
        return self._move("cuCheckpointProcessUnlock", pid, args, 1, 0)

    def cuCheckpointProcessGetRestoreThreadId(self, pid: int) -> tuple[CUresult, int]:
        self._record("cuCheckpointProcessGetRestoreThreadId", pid)
        return CUresult.CUDA_SUCCESS, pid + 1


@dataclass
class MemoryInfo:
    total: int
    free: int
    used: int


@dataclass
class ProcessInfo:
    pid: int
    usedGpuMemory: int | None


class FakeNvml(types.ModuleType):
    """pynvml as far as the backend uses it."""

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        super().__init__("pynvml")
        self.inits = 0
        self.devices: list[tuple[str | bytes, str | bytes, MemoryInfo, list[ProcessInfo]]] = [
            (GPU_A, "NVIDIA H100 80GB HBM3", MemoryInfo(80 << 30, 70 << 30, 10 << 30),
             [ProcessInfo(4242, 6 << 30), ProcessInfo(77, None)]),
            (GPU_B.encode(), b"NVIDIA H100 80GB HBM3", MemoryInfo(80 << 30, 79 << 30, 1 << 30),
             [ProcessInfo(4242, 1 << 30)]),
        ]

    def nvmlInit(self) -> None:
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.inits -= 1

    def nvmlSystemGetDriverVersion(self) -> bytes:
        return b"580.65.06"

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str | bytes:
        return self.devices[handle][0]

    def nvmlDeviceGetName(self, handle: int) -> str | bytes:
        return self.devices[handle][1]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> MemoryInfo:
        return self.devices[handle][2]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[ProcessInfo]:
        return self.devices[handle][3]


@pytest.fixture
def modules(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeDriverModule, FakeNvml]]:
    driver, nvml = FakeDriverModule(), FakeNvml()
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.driver = driver  # type: ignore[attr-defined]
    cuda.bindings = bindings  # type: ignore[attr-defined]
    for name, module in (("cuda", cuda), ("cuda.bindings", bindings),
                         ("cuda.bindings.driver", driver), ("pynvml", nvml)):
        monkeypatch.setitem(sys.modules, name, module)
    yield driver, nvml


def test_state_machine_calls_and_structs(modules: tuple[FakeDriverModule, FakeNvml]) -> None:
    driver, _ = modules
    backend = DriverApiBackend()
    DriverApiBackend()
    assert [c for c in driver.calls if c[0] == "cuInit"] == [("cuInit", (0,))] * 2

    driver.states[4242] = CUprocessState.CU_PROCESS_STATE_RUNNING
    assert backend.get_state(4242) is CudaState.RUNNING
    backend.lock(4242, 2500)
    backend.checkpoint(4242)
    assert backend.get_state(4242) is CudaState.CHECKPOINTED
    backend.restore(4242, {GPU_A: GPU_B, GPU_B: GPU_A})
    backend.unlock(4242)
    assert backend.restore_thread_id(4242) == 4243

    by_name = {name: args for name, args in driver.calls}
    lock_args = by_name["cuCheckpointProcessLock"][1]
    assert isinstance(lock_args, CUcheckpointLockArgs) and lock_args.timeoutMs == 2500
    assert by_name["cuCheckpointProcessCheckpoint"] == (4242, None)
    assert by_name["cuCheckpointProcessUnlock"] == (4242, None)
    restore_args = by_name["cuCheckpointProcessRestore"][1]
    assert restore_args.gpuPairsCount == 2
    pairs = [(p.oldUuid.bytes.hex(), p.newUuid.bytes.hex()) for p in restore_args.gpuPairs]
    assert pairs == [("aaaaaaaa000040008000000000000001", "bbbbbbbb000040008000000000000002"),
                     ("bbbbbbbb000040008000000000000002", "aaaaaaaa000040008000000000000001")]


def test_restore_without_a_map_passes_no_args(modules: tuple[FakeDriverModule, FakeNvml]) -> None:
    driver, _ = modules
    driver.states[5] = CUprocessState.CU_PROCESS_STATE_CHECKPOINTED
    backend = DriverApiBackend()
    backend.restore(5)
    assert driver.calls[-1] == ("cuCheckpointProcessRestore", (5, None))
    with pytest.raises(InvalidArgument, match="two GPUs onto one"):
        backend.restore(5, {GPU_A: GPU_B, GPU_B: GPU_B})
    with pytest.raises(InvalidArgument, match="not a GPU UUID"):
        backend.restore(5, {"0": GPU_B})


def test_driver_errors_carry_name_string_and_pid(
        modules: tuple[FakeDriverModule, FakeNvml]) -> None:
    driver, _ = modules
    backend = DriverApiBackend()
    driver.states[9] = CUprocessState.CU_PROCESS_STATE_RUNNING
    with pytest.raises(CudaError) as err:
        backend.checkpoint(9)
    assert err.value.pid == 9 and err.value.error_name == "CUDA_ERROR_ILLEGAL_STATE"
    assert str(err.value) == ("cuCheckpointProcessCheckpoint failed: pid 9: "
                              "CUDA_ERROR_ILLEGAL_STATE: text of CUDA_ERROR_ILLEGAL_STATE")

    driver.fail_next["cuCheckpointProcessLock"] = CUresult.CUDA_ERROR_TIMEOUT
    with pytest.raises(CudaLockTimeout, match="lock of pid 9 timed out after 100 ms"):
        backend.lock(9, 100)
    assert backend.get_state(9) is CudaState.RUNNING
    driver.fail_next["cuCheckpointProcessLock"] = CUresult.CUDA_ERROR_INVALID_VALUE
    with pytest.raises(CudaError, match="CUDA_ERROR_INVALID_VALUE"):
        backend.lock(9, 100_000)

    driver.fail_next["cuInit"] = CUresult.CUDA_ERROR_NOT_INITIALIZED
    with pytest.raises(CudaError, match="cuInit failed: CUDA_ERROR_NOT_INITIALIZED"):
        DriverApiBackend()


def test_missing_bindings_or_old_bindings(monkeypatch: pytest.MonkeyPatch,
                                          modules: tuple[FakeDriverModule, FakeNvml]) -> None:
    driver, _ = modules
    monkeypatch.delattr(driver, "CUcheckpointLockArgs")
    with pytest.raises(FailedPrecondition, match="missing: CUcheckpointLockArgs"):
        DriverApiBackend()
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(FailedPrecondition, match="cuda-bindings is not installed"):
        DriverApiBackend()


def test_inventory_usage_and_discovery_through_nvml(
        modules: tuple[FakeDriverModule, FakeNvml]) -> None:
    driver, nvml = modules
    backend = DriverApiBackend()
    gpus = backend.gpus()
    assert [(g.index, g.uuid, g.model, g.memory_free) for g in gpus] == [
        (0, GPU_A, "NVIDIA H100 80GB HBM3", 70 << 30),
        (1, GPU_B, "NVIDIA H100 80GB HBM3", 79 << 30)]
    assert backend.process_gpu_memory(4242) == {GPU_A: 6 << 30, GPU_B: 1 << 30}
    assert backend.process_gpu_memory(77) == {GPU_A: 0}
    assert backend.compute_pids() == {4242, 77}
    assert backend.driver_version() == "580.65.06"
    assert nvml.inits == 1

    # Not holding /dev/nvidia* (nothing does here): the driver's state query decides.
    driver.states[31] = CUprocessState.CU_PROCESS_STATE_CHECKPOINTED
    assert find_cuda_pids([4242, 31], backend) == [31]
    backend.close()
    assert nvml.inits == 0
