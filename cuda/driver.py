"""The CUDA driver's checkpoint API through NVIDIA's cuda-bindings, and NVML for the
GPU inventory. Both are imported when a backend is built, so the package imports
on machines without them (install the `gpu` extra on GPU nodes).

Driver calls (cuda.bindings.driver) return a tuple whose first item is a CUresult:
    cuCheckpointProcessGetState(pid)                  -> (err, CUprocessState)
    cuCheckpointProcessLock(pid, CUcheckpointLockArgs)-> (err,)
    cuCheckpointProcessCheckpoint(pid, None)          -> (err,)
    cuCheckpointProcessRestore(pid, args or None)     -> (err,)
    cuCheckpointProcessUnlock(pid, None)              -> (err,)
    cuCheckpointProcessGetRestoreThreadId(pid)        -> (err, tid)
GPU remapping on restore (CUDA 13, driver R580+) fills CUcheckpointRestoreArgs.gpuPairs
with CUcheckpointGpuPair{oldUuid, newUuid}; the driver wants a pair for every GPU
visible to the kernel driver, not only those CUDA_VISIBLE_DEVICES shows the process.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from kybernate.cuda.backend import (
    CudaError,
    CudaLockTimeout,
    CudaState,
    GpuInfo,
    gpu_uuid_bytes,
    validate_pid,
    validate_timeout_ms,
)
from kybernate.errors import FailedPrecondition, InvalidArgument, Unimplemented

# Errors by which the driver says the lock was not taken in time.
_LOCK_TIMEOUT_ERRORS = frozenset({"CUDA_ERROR_TIMEOUT", "CUDA_ERROR_NOT_READY"})


class DriverApiBackend:
    """cuCheckpointProcess* through cuda-bindings; inventory and usage through NVML."""

    name = "driver"

    def __init__(self) -> None:
        try:
            from cuda.bindings import driver
        except ImportError as err:
            raise FailedPrecondition(
                f"cuda-bindings is not installed (pip install 'kybernate[gpu]'): {err}"
            ) from None
        self._driver: Any = driver
        missing = [
            name for name in (
                "cuCheckpointProcessGetState", "cuCheckpointProcessLock",
                "cuCheckpointProcessCheckpoint", "cuCheckpointProcessRestore",
                "cuCheckpointProcessUnlock", "cuCheckpointProcessGetRestoreThreadId",
                "CUcheckpointLockArgs", "CUcheckpointRestoreArgs",
            ) if not hasattr(driver, name)
        ]
        if missing:
            raise FailedPrecondition(
                "cuda-bindings has no checkpoint API (needs 12.8 or newer); missing: "
                + ", ".join(missing))
        # cuInit once per backend; the checkpoint calls need an initialised driver but
        # no context of their own.
        self._check(self._invoke("cuInit", 0), "cuInit")
        self._nvml: Any = None
        self._nvml_lock = threading.Lock()

    # -- checkpoint state machine --------------------------------------------------------

    def is_cuda_process(self, pid: int) -> bool:
        """True for any pid the driver knows a checkpoint state of: running CUDA
        processes, and checkpointed ones, which hold no device file any more."""
        validate_pid(pid)
        try:
            self.get_state(pid)
        except CudaError:
            return False
        return True

    def get_state(self, pid: int) -> CudaState:
        validate_pid(pid)
        result = self._invoke("cuCheckpointProcessGetState", pid)
        state = self._check(result, "cuCheckpointProcessGetState", pid)
        try:
            return CudaState(int(state))
        except ValueError:
            raise CudaError(f"unknown CUDA process state {int(state)}", pid=pid) from None

    def lock(self, pid: int, timeout_ms: int) -> None:
        validate_pid(pid)
        validate_timeout_ms(timeout_ms)
        args = self._driver.CUcheckpointLockArgs()
        args.timeoutMs = timeout_ms
        started = time.monotonic()
        result = self._invoke("cuCheckpointProcessLock", pid, args)
        err = result[0]
        if err == self._driver.CUresult.CUDA_SUCCESS:
            return
        name, text = self._error_name(err)
        elapsed_ms = (time.monotonic() - started) * 1000
        # On timeout the driver leaves the process RUNNING; report it as such.
        if name in _LOCK_TIMEOUT_ERRORS or (timeout_ms and elapsed_ms >= timeout_ms):
            raise CudaLockTimeout(pid, timeout_ms, f"{name}: {text}")
        raise CudaError("cuCheckpointProcessLock failed", pid=pid, error_name=name,
                        error_string=text)

    def checkpoint(self, pid: int) -> None:
        validate_pid(pid)
        self._check(self._invoke("cuCheckpointProcessCheckpoint", pid, None),
                    "cuCheckpointProcessCheckpoint", pid)

    def restore(self, pid: int, gpu_map: Mapping[str, str] | None = None) -> None:
        validate_pid(pid)
        args = self._restore_args(gpu_map) if gpu_map else None
        self._check(self._invoke("cuCheckpointProcessRestore", pid, args),
                    "cuCheckpointProcessRestore", pid)

    def unlock(self, pid: int) -> None:
        validate_pid(pid)
        self._check(self._invoke("cuCheckpointProcessUnlock", pid, None),
                    "cuCheckpointProcessUnlock", pid)

    def restore_thread_id(self, pid: int) -> int:
        validate_pid(pid)
        tid = self._check(self._invoke("cuCheckpointProcessGetRestoreThreadId", pid),
                          "cuCheckpointProcessGetRestoreThreadId", pid)
        return int(tid)

    # -- NVML: inventory and usage -------------------------------------------------------

    def gpus(self) -> list[GpuInfo]:
        nvml = self._nvml_module()
        gpus = []
        with self._nvml_errors("GPU inventory"):
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                gpus.append(GpuInfo(
                    index=index,
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    model=_text(nvml.nvmlDeviceGetName(handle)),
                    memory_total=int(memory.total),
                    memory_free=int(memory.free),
                ))
        return gpus

    def driver_version(self) -> str:
        """The kernel driver's version as NVML reports it, e.g. "580.65.06"."""
        nvml = self._nvml_module()
        with self._nvml_errors("driver version"):
            return _text(nvml.nvmlSystemGetDriverVersion())

    def process_gpu_memory(self, pid: int) -> dict[str, int]:
        validate_pid(pid)
        usage: dict[str, int] = {}
        for uuid, processes in self._compute_processes().items():
            for process in processes:
                if int(process.pid) == pid:
                    # usedGpuMemory is None where the driver cannot tell (some vGPU/MIG).
                    used = process.usedGpuMemory
                    usage[uuid] = usage.get(uuid, 0) + (int(used) if used is not None else 0)
        return usage

    def compute_pids(self) -> set[int] | None:
        """Pids NVML lists as compute processes on any GPU; None when NVML is unusable."""
        try:
            return {int(p.pid) for ps in self._compute_processes().values() for p in ps}
        except (FailedPrecondition, CudaError):
            return None

    def _compute_processes(self) -> dict[str, list[Any]]:
        nvml = self._nvml_module()
        by_gpu: dict[str, list[Any]] = {}
        with self._nvml_errors("compute processes"):
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                by_gpu[_text(nvml.nvmlDeviceGetUUID(handle))] = list(
                    nvml.nvmlDeviceGetComputeRunningProcesses(handle))
        return by_gpu

    def _nvml_module(self) -> Any:
        # The coordinator calls from several executor threads at once.
        with self._nvml_lock:
            if self._nvml is None:
                try:
                    import pynvml
                except ImportError as err:
                    raise FailedPrecondition(
                        f"nvidia-ml-py is not installed (pip install 'kybernate[gpu]'): {err}"
                    ) from None
                try:
                    pynvml.nvmlInit()
                except pynvml.NVMLError as err:
                    raise FailedPrecondition(f"NVML did not initialise: {err}") from None
                self._nvml = pynvml
            return self._nvml

    @contextlib.contextmanager
    def _nvml_errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except self._nvml.NVMLError as err:
            raise CudaError(f"NVML query for {what} failed: {err}",
                            error_name=type(err).__name__) from None

    def close(self) -> None:
        """Release NVML; the driver itself stays initialised for the process's life."""
        with self._nvml_lock:
            if self._nvml is not None:
                self._nvml.nvmlShutdown()
                self._nvml = None

    # -- helpers --------------------------------------------------------------------------

    def _restore_args(self, gpu_map: Mapping[str, str]) -> Any:
        driver = self._driver
        if not hasattr(driver, "CUcheckpointGpuPair"):
            raise Unimplemented(
                "GPU remapping on restore needs cuda-bindings 13 and driver R580 or newer")
        if len({gpu_uuid_bytes(new) for new in gpu_map.values()}) != len(gpu_map):
            raise InvalidArgument(f"GPU map sends two GPUs onto one: {dict(gpu_map)}")
        pairs = []
        for old, new in gpu_map.items():
            pair = driver.CUcheckpointGpuPair()
            pair.oldUuid = self._cu_uuid(old)
            pair.newUuid = self._cu_uuid(new)
            pairs.append(pair)
        args = driver.CUcheckpointRestoreArgs()
        args.gpuPairs = pairs
        args.gpuPairsCount = len(pairs)
        return args

    def _cu_uuid(self, uuid: str) -> Any:
        value = self._driver.CUuuid()
        try:
            value.bytes = gpu_uuid_bytes(uuid)  # CUuuid_st.bytes: char[16]
        except (AttributeError, TypeError) as err:
            raise Unimplemented(f"this cuda-bindings cannot build a CUuuid: {err}") from None
        return value

    def _invoke(self, call: str, *args: Any) -> Any:
        """Call a driver function; cuda-bindings raises RuntimeError when libcuda.so, or
        the function in it, is missing (no driver, or one older than the bindings)."""
        try:
            return getattr(self._driver, call)(*args)
        except RuntimeError as err:
            raise FailedPrecondition(f"CUDA driver cannot run {call}: {err}") from None

    def _check(self, result: Any, call: str, pid: int | None = None) -> Any:
        """The call's value (None, one item or a tuple); CudaError when it failed."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self._driver.CUresult.CUDA_SUCCESS:
            name, text = self._error_name(err)
            raise CudaError(f"{call} failed", pid=pid, error_name=name, error_string=text)
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    def _error_name(self, err: Any) -> tuple[str, str]:
        driver = self._driver
        name_result = driver.cuGetErrorName(err)
        text_result = driver.cuGetErrorString(err)
        name = _text(name_result[1]) if name_result[0] == driver.CUresult.CUDA_SUCCESS else ""
        text = _text(text_result[1]) if text_result[0] == driver.CUresult.CUDA_SUCCESS else ""
        return name or f"CUresult {int(err)}", text


def _text(value: str | bytes) -> str:
    """NVML and the driver return bytes in older bindings, str in newer ones."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
