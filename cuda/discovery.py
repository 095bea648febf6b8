"""Which processes of a container are CUDA processes."""

from __future__ import annotations

from collections.abc import Iterable

from kybernate.cuda import procfs
from kybernate.cuda.backend import CudaBackend


def find_cuda_pids(pids: Iterable[int], backend: CudaBackend) -> list[int]:
    """The pids (in the given order, without repeats) that hold CUDA state.

    A running CUDA process holds /dev/nvidia* open and NVML lists it as a compute
    process: that is one NVML query for all pids. A checkpointed one has closed its
    device files and left NVML's list (its memory is on the host), so every pid not
    confirmed that way is put to the backend's own is_cuda_process (the driver's
    checkpoint state query, or the fake's environment marker).
    """
    unique = list(dict.fromkeys(pids))
    listed: set[int] | None = None
    compute_pids = getattr(backend, "compute_pids", None)
    if callable(compute_pids):
        listed = compute_pids()
    found = []
    for pid in unique:
        if listed is not None and pid in listed and procfs.holds_nvidia_device(pid) or backend.is_cuda_process(pid):
            found.append(pid)
    return found
