"""Choosing a CUDA backend for this node."""

from __future__ import annotations

import shutil
from collections.abc import Mapping

from kybernate.cuda.backend import CudaBackend, CudaError, CudaState, GpuInfo, validate_pid
from kybernate.errors import FailedPrecondition, InvalidArgument, KybernateError

BACKEND_NAMES = ("auto", "driver", "tool", "fake", "none")


class NoGpuBackend:
    """A node without GPUs: no process is a CUDA process, and there is nothing to inventory."""

    name = "none"

    def is_cuda_process(self, pid: int) -> bool:
        validate_pid(pid)
        return False

    def get_state(self, pid: int) -> CudaState:
        raise self._absent(pid)

    def lock(self, pid: int, timeout_ms: int) -> None:
        raise self._absent(pid)

    def checkpoint(self, pid: int) -> None:
        raise self._absent(pid)

    def restore(self, pid: int, gpu_map: Mapping[str, str] | None = None) -> None:
        raise self._absent(pid)

    def unlock(self, pid: int) -> None:
        raise self._absent(pid)

    def restore_thread_id(self, pid: int) -> int:
        raise self._absent(pid)

    def gpus(self) -> list[GpuInfo]:
        return []

    def process_gpu_memory(self, pid: int) -> dict[str, int]:
        return {}

    def process_gpus(self, pid: int) -> set[str]:
        return set()

    def driver_version(self) -> str:
        return ""

    @staticmethod
    def _absent(pid: int) -> CudaError:
        return CudaError("no CUDA driver on this node", pid=pid, error_name="CUDA_ERROR_NO_DEVICE")


def load_backend(name: str = "auto", *, fake_dir: str | None = None) -> CudaBackend:
    """The backend called `name`; "auto" takes the driver API if cuda-bindings imports and
    cuInit works, else the cuda-checkpoint tool if it is on PATH, else NoGpuBackend."""
    if name == "fake":
        from kybernate.cuda.fake import FakeBackend

        return FakeBackend(fake_dir)
    if name == "driver":
        from kybernate.cuda.driver import DriverApiBackend

        return DriverApiBackend()
    if name == "tool":
        from kybernate.cuda.tool import CheckpointToolBackend

        return CheckpointToolBackend()
    if name == "none":
        return NoGpuBackend()
    if name != "auto":
        raise InvalidArgument(f"unknown CUDA backend {name!r}; one of {', '.join(BACKEND_NAMES)}")
    try:
        from kybernate.cuda.driver import DriverApiBackend

        return DriverApiBackend()
    except (FailedPrecondition, CudaError):
        pass  # no bindings, or no usable driver (cuInit failed): try the tool
    if shutil.which("cuda-checkpoint"):
        from kybernate.cuda.tool import CheckpointToolBackend

        try:
            return CheckpointToolBackend()
        except KybernateError:
            pass
    return NoGpuBackend()
