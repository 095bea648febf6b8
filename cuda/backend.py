"""What every CUDA backend offers: the checkpoint state machine, GPU inventory, errors.

The state machine is the CUDA driver's own (cuCheckpointProcess*):

    RUNNING --lock--> LOCKED --checkpoint--> CHECKPOINTED --restore--> LOCKED --unlock--> RUNNING

A lock that times out leaves the process RUNNING. FAILED is terminal for the process.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from kybernate.errors import DeadlineExceeded, Internal, InvalidArgument


class CudaState(enum.IntEnum):
    """CUprocessState; the values are the driver's. CHECKPOINTING and RESTORING are the
    transient states drivers of CUDA 13.4 and later report while a step is under way."""

    RUNNING = 0
    LOCKED = 1
    CHECKPOINTED = 2
    FAILED = 3
    CHECKPOINTING = 4
    RESTORING = 5


@dataclass(frozen=True)
class GpuInfo:
    """One GPU of the node; memory in bytes."""

    index: int
    uuid: str
    model: str
    memory_total: int
    memory_free: int


class CudaError(Internal):
    """A CUDA checkpoint call failed; carries the driver's (or tool's) error and the pid."""

    def __init__(
        self,
        message: str,
        *,
        pid: int | None = None,
        error_name: str | None = None,
        error_string: str | None = None,
    ) -> None:
        parts = [message]
        if pid is not None:
            parts.append(f"pid {pid}")
        if error_name:
            parts.append(error_name if not error_string else f"{error_name}: {error_string}")
        super().__init__(": ".join(parts) if len(parts) > 1 else message)
        self.pid = pid
        self.error_name = error_name
        self.error_string = error_string


class CudaLockTimeout(DeadlineExceeded):
    """cuCheckpointProcessLock did not get the lock in time; the process is still RUNNING."""

    def __init__(self, pid: int, timeout_ms: int, detail: str = "") -> None:
        message = f"CUDA lock of pid {pid} timed out after {timeout_ms} ms"
        if detail:
            message = f"{message} ({detail})"
        super().__init__(message)
        self.pid = pid
        self.timeout_ms = timeout_ms


@runtime_checkable
class CudaBackend(Protocol):
    """One way of driving the CUDA checkpoint API. Every method blocks; call from a thread."""

    name: str

    def is_cuda_process(self, pid: int) -> bool: ...

    def get_state(self, pid: int) -> CudaState: ...

    def lock(self, pid: int, timeout_ms: int) -> None: ...

    def checkpoint(self, pid: int) -> None: ...

    def restore(self, pid: int, gpu_map: Mapping[str, str] | None = None) -> None: ...

    def unlock(self, pid: int) -> None: ...

    def restore_thread_id(self, pid: int) -> int: ...

    def gpus(self) -> list[GpuInfo]: ...

    def process_gpu_memory(self, pid: int) -> dict[str, int]: ...

    def process_gpus(self, pid: int) -> set[str]:
        """UUIDs of every GPU the process's CUDA state covers: the ones a checkpoint
        records and a restore's GPU map must name, memory held there or not."""
        ...


def has_checkpoint_state(backend: CudaBackend, pid: int) -> bool:
    """Whether the driver knows a checkpoint state of `pid`: true of running CUDA
    processes and of checkpointed ones, which hold no device file any more."""
    validate_pid(pid)
    try:
        backend.get_state(pid)
    except CudaError:
        return False
    return True


_UUID_HEX = re.compile(r"^[0-9a-fA-F]{32}$")


def gpu_uuid_bytes(uuid: str) -> bytes:
    """The 16 raw bytes of a GPU UUID given as NVML prints it ("GPU-xxxxxxxx-xxxx-...")."""
    text = uuid.strip()
    for prefix in ("GPU-", "MIG-"):
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    hex_digits = text.replace("-", "")
    if not _UUID_HEX.match(hex_digits):
        raise InvalidArgument(f"not a GPU UUID: {uuid!r}")
    return bytes.fromhex(hex_digits)


def gpu_uuid_text(raw: bytes) -> str:
    """NVML's spelling ("GPU-8-4-4-4-12") of 16 raw UUID bytes, as CUDA's CUuuid holds them."""
    if len(raw) != 16:
        raise InvalidArgument(f"a GPU UUID has 16 bytes, got {len(raw)}")
    h = raw.hex()
    return f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def is_identity_map(gpu_map: Mapping[str, str] | None) -> bool:
    """True when a GPU map moves nothing (or is absent): a restore then needs no map."""
    return not gpu_map or all(
        gpu_uuid_bytes(old) == gpu_uuid_bytes(new) for old, new in gpu_map.items())


def validate_gpu_map(gpu_map: Mapping[str, str]) -> dict[str, str]:
    """The map with its UUIDs checked; refuses two checkpointed GPUs sent onto one."""
    targets: dict[bytes, str] = {}
    for old, new in gpu_map.items():
        gpu_uuid_bytes(old)
        raw = gpu_uuid_bytes(new)
        if raw in targets:
            raise InvalidArgument(
                f"GPU map sends two GPUs onto one ({targets[raw]} and {old} onto {new}): "
                f"{dict(gpu_map)}")
        targets[raw] = old
    return dict(gpu_map)


def validate_timeout_ms(timeout_ms: int) -> int:
    """The driver takes an unsigned 32-bit timeout; 0 means wait forever."""
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int):
        raise InvalidArgument(f"lock timeout must be an int of milliseconds, got {timeout_ms!r}")
    if not 0 <= timeout_ms <= 0xFFFFFFFF:
        raise InvalidArgument(f"lock timeout out of range: {timeout_ms} ms")
    return timeout_ms


def validate_pid(pid: int) -> int:
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        raise InvalidArgument(f"not a process id: {pid!r}")
    return pid
