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

What the packages allow, as tried on cuda-bindings 12.8.0, 12.9.0, 12.9.10, 13.0.0-13.0.3,
13.1.0, 13.1.1, 13.2.0, 13.3.0, 13.3.1, 13.4.4 and 13.5.0:
- CUuuid.bytes is read-only; CUuuid() owns 16 zeroed bytes at getPtr(), which ctypes
  can write. Assigning a CUuuid to CUcheckpointGpuPair.oldUuid/newUuid copies it.
- CUcheckpointRestoreArgs.gpuPairs takes a list of CUcheckpointGpuPair and copies it
  into memory the args own; it does not set gpuPairsCount, which must be set as well.
  Anything but pairs in that list crashes the interpreter.
- 12.x has no CUcheckpointGpuPair and no gpuPairs field: no GPU remapping.
- 13.0.0 and 13.0.1 lack cuCheckpointProcessRestore and CUcheckpointRestoreArgs
  altogether; 13.3.0 lacks CUcheckpointRestoreArgs (a restore without a map works).
- Without libcuda every driver call raises a RuntimeError subclass; CUresult is an
  int enum whose names need no driver.
The driver wants the pair array, when there is one, to name every checkpointed GPU
(NVIDIA's documentation of cuCheckpointProcessRestore), so a restore that moves
nothing passes no arguments at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from kybernate.cuda import procfs
from kybernate.cuda.backend import (
    CudaError,
    CudaLockTimeout,
    CudaState,
    GpuInfo,
    gpu_uuid_bytes,
    has_checkpoint_state,
    is_identity_map,
    validate_gpu_map,
    validate_pid,
    validate_timeout_ms,
)
from kybernate.errors import FailedPrecondition, Unimplemented

log = logging.getLogger(__name__)

# Errors by which the driver says the lock was not taken in time.
_LOCK_TIMEOUT_ERRORS = frozenset({"CUDA_ERROR_TIMEOUT", "CUDA_ERROR_NOT_READY"})

# What this backend was verified with; pyproject's `gpu` extra says the same.
MIN_DRIVER_API = 12080  # CUDA 12.8 (driver R570): cuCheckpointProcess* in the driver
REMAP_DRIVER_API = 13000  # CUDA 13.0 (driver R580): GPU pairs on restore
SUPPORTED_BINDINGS = "cuda-bindings 12.8 to 13.x, except 13.0.0 and 13.0.1"
_STATE_MACHINE_NAMES = (
    "cuCheckpointProcessGetState", "cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint",
    "cuCheckpointProcessRestore", "cuCheckpointProcessUnlock",
    "cuCheckpointProcessGetRestoreThreadId", "CUcheckpointLockArgs",
)


@dataclass(frozen=True)
class DriverSupport:
    """What this node's bindings and driver can do, and why not where they cannot."""

    bindings_version: str
    driver_api_version: int  # cuDriverGetVersion: 1000 * major + 10 * minor
    remap: bool
    remap_refusal: str = ""

    @property
    def driver_api(self) -> str:
        return api_version_text(self.driver_api_version)


def api_version_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def _version_tuple(text: str) -> tuple[int, ...]:
    """(13, 4, 0) for "13.4.0" and for a pre-release such as "13.4.0b1"."""
    match = re.match(r"^(\d+(?:\.\d+)*)", text.strip())
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


def check_support(driver: Any, bindings_version: str, driver_api_version: int) -> DriverSupport:
    """FailedPrecondition, naming the versions, where the checkpoint state machine cannot
    run; otherwise what the node supports. Reads the bindings' classes, calls nothing."""
    found = f"cuda-bindings {bindings_version}, driver API {api_version_text(driver_api_version)}"
    version = _version_tuple(bindings_version)
    if not version or version < (12, 8) or version[0] >= 14:
        raise FailedPrecondition(
            f"{found}: Kybernate's driver backend supports {SUPPORTED_BINDINGS} "
            "(pip install 'kybernate[gpu]')")
    missing = [name for name in _STATE_MACHINE_NAMES if not hasattr(driver, name)]
    if missing:
        raise FailedPrecondition(
            f"{found} lacks the checkpoint API ({', '.join(missing)}); supported: "
            f"{SUPPORTED_BINDINGS}")
    if driver_api_version < MIN_DRIVER_API:
        raise FailedPrecondition(
            f"{found}: the CUDA checkpoint API needs a driver of CUDA "
            f"{api_version_text(MIN_DRIVER_API)} (R570) or newer")
    refusal = ""
    args_type = getattr(driver, "CUcheckpointRestoreArgs", None)
    if not hasattr(driver, "CUcheckpointGpuPair") or args_type is None \
            or not hasattr(args_type(), "gpuPairs"):
        refusal = (f"{found} cannot pass GPU pairs to cuCheckpointProcessRestore "
                   "(cuda-bindings 13.0.2 or newer, not 13.3.0, has them)")
    elif driver_api_version < REMAP_DRIVER_API:
        refusal = (f"{found}: restoring onto other GPUs needs a driver of CUDA "
                   f"{api_version_text(REMAP_DRIVER_API)} (R580) or newer")
    return DriverSupport(bindings_version, driver_api_version, not refusal, refusal)


def cu_uuid(driver: Any, uuid: str) -> Any:
    """A cuda-bindings CUuuid holding the GPU UUID `uuid` ("GPU-..." as NVML prints it).
    Its bytes field is read-only, so the 16 bytes go into the struct's own memory."""
    raw = gpu_uuid_bytes(uuid)
    value = driver.CUuuid()
    ctypes.memmove(value.getPtr(), raw, len(raw))
    if bytes(value.bytes) != raw:
        raise Unimplemented(f"this cuda-bindings does not lay out CUuuid as 16 bytes: "
                            f"wrote {raw.hex()}, it reads {bytes(value.bytes).hex()}")
    return value


def restore_args(driver: Any, support: DriverSupport,
                 gpu_map: Mapping[str, str] | None) -> Any:
    """cuCheckpointProcessRestore's second argument: None when nothing moves, else
    CUcheckpointRestoreArgs with one pair per entry of the map, which must name every
    checkpointed GPU. Unimplemented, with the versions, where the node cannot remap."""
    if gpu_map:
        validate_gpu_map(gpu_map)
    if is_identity_map(gpu_map):
        return None
    assert gpu_map is not None
    if not support.remap:
        raise Unimplemented(f"cannot restore onto other GPUs ({dict(gpu_map)}): "
                            f"{support.remap_refusal}")
    pairs = []
    for old, new in gpu_map.items():
        pair = driver.CUcheckpointGpuPair()
        pair.oldUuid = cu_uuid(driver, old)
        pair.newUuid = cu_uuid(driver, new)
        pairs.append(pair)
    args = driver.CUcheckpointRestoreArgs()
    args.gpuPairs = pairs
    args.gpuPairsCount = len(pairs)
    return args


def error_name(driver: Any, err: Any) -> tuple[str, str]:
    """The CUresult's name (from the bindings' enum, so it needs no driver) and the
    driver's description of it where the driver can give one."""
    try:
        name = driver.CUresult(int(err)).name
    except ValueError:
        name = f"CUresult {int(err)}"
    text = ""
    try:
        result = driver.cuGetErrorString(err)
        if result[0] == driver.CUresult.CUDA_SUCCESS and result[1]:
            text = _text(result[1])
    except RuntimeError:  # no libcuda: the name has to do
        pass
    return name, text


def import_bindings() -> tuple[Any, str]:
    """cuda.bindings.driver and the package's version; FailedPrecondition saying why not."""
    try:
        import cuda.bindings
        from cuda.bindings import driver
    except ImportError as err:
        found = getattr(sys.modules.get("cuda"), "__file__", None)
        if found:  # NVIDIA's `cuda` is a namespace package: it has no __file__
            raise FailedPrecondition(
                f"'cuda' is imported from {found}, which shadows NVIDIA's cuda-bindings "
                "(a folder named cuda on sys.path, e.g. Kybernate's source tree as the "
                f"working directory): {err}") from None
        raise FailedPrecondition(
            f"cuda-bindings is not installed (pip install 'kybernate[gpu]'): {err}") from None
    return driver, str(getattr(cuda.bindings, "__version__", "unknown"))


class DriverApiBackend:
    """cuCheckpointProcess* through cuda-bindings; inventory and usage through NVML."""

    name = "driver"

    def __init__(self) -> None:
        driver, bindings_version = import_bindings()
        self._driver: Any = driver
        check_support(driver, bindings_version, MIN_DRIVER_API)  # the bindings alone first
        # cuInit once per backend; the checkpoint calls need an initialised driver but
        # no context of their own.
        self._check(self._invoke("cuInit", 0), "cuInit")
        api_version = int(self._check(self._invoke("cuDriverGetVersion"), "cuDriverGetVersion"))
        self.support = check_support(driver, bindings_version, api_version)
        if not self.support.remap:
            log.warning("GPU remapping on restore unavailable: %s", self.support.remap_refusal)
        self._nvml: Any = None
        self._nvml_lock = threading.Lock()

    # -- checkpoint state machine --------------------------------------------------------

    def is_cuda_process(self, pid: int) -> bool:
        return has_checkpoint_state(self, pid)

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
        name, text = error_name(self._driver, err)
        elapsed_ms = (time.monotonic() - started) * 1000
        # On timeout the driver leaves the process RUNNING; report it as such.
        if name in _LOCK_TIMEOUT_ERRORS or (timeout_ms and elapsed_ms >= timeout_ms):
            raise CudaLockTimeout(pid, timeout_ms, f"{name}: {text}" if text else name)
        raise CudaError("cuCheckpointProcessLock failed", pid=pid, error_name=name,
                        error_string=text)

    def checkpoint(self, pid: int) -> None:
        validate_pid(pid)
        self._check(self._invoke("cuCheckpointProcessCheckpoint", pid, None),
                    "cuCheckpointProcessCheckpoint", pid)

    def restore(self, pid: int, gpu_map: Mapping[str, str] | None = None) -> None:
        validate_pid(pid)
        args = restore_args(self._driver, self.support, gpu_map)
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
        """The kernel driver's version as NVML reports it, e.g. "580.65.06"; the CUDA
        driver API version where NVML cannot say (metadata, not a reason to fail)."""
        try:
            nvml = self._nvml_module()
            with self._nvml_errors("driver version"):
                return _text(nvml.nvmlSystemGetDriverVersion())
        except (FailedPrecondition, CudaError) as err:
            return f"CUDA driver API {self.support.driver_api} (NVML: {err})"

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

    def process_gpus(self, pid: int) -> set[str]:
        """GPUs whose device nodes the process holds (NVML gives each GPU's minor number),
        and any where NVML lists it as a compute process."""
        validate_pid(pid)
        minors = procfs.held_gpu_minors(pid)
        held = set(self.process_gpu_memory(pid))
        if minors:
            nvml = self._nvml_module()
            with self._nvml_errors("GPU minor numbers"):
                for index in range(nvml.nvmlDeviceGetCount()):
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    if int(nvml.nvmlDeviceGetMinorNumber(handle)) in minors:
                        held.add(_text(nvml.nvmlDeviceGetUUID(handle)))
        return held

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
            name, text = error_name(self._driver, err)
            raise CudaError(f"{call} failed", pid=pid, error_name=name, error_string=text)
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)


def _text(value: str | bytes) -> str:
    """NVML and the driver return bytes in older bindings, str in newer ones."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
