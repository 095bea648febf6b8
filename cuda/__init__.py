"""GPU state of a container's processes: find the CUDA processes, lock, checkpoint,
restore and unlock them, through the CUDA driver API (cuda-bindings), NVIDIA's
cuda-checkpoint tool, or a file-backed fake for machines without a GPU.

Imports nothing of Kybernate but kybernate.errors; the real backends import NVIDIA's
packages only when they are built.
"""

from kybernate.cuda.backend import CudaBackend, CudaError, CudaLockTimeout, CudaState, GpuInfo
from kybernate.cuda.coordinator import CudaCoordinator, ProcessStep, StepReport, report_to_json
from kybernate.cuda.discovery import find_cuda_pids
from kybernate.cuda.loader import NoGpuBackend, load_backend

__all__ = [
    "CudaBackend",
    "CudaCoordinator",
    "CudaError",
    "CudaLockTimeout",
    "CudaState",
    "GpuInfo",
    "NoGpuBackend",
    "ProcessStep",
    "StepReport",
    "find_cuda_pids",
    "load_backend",
    "report_to_json",
]
