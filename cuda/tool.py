"""NVIDIA's `cuda-checkpoint` command-line tool as a backend, for nodes where the Python
bindings are absent; GPU inventory and usage come from `nvidia-smi`'s CSV queries.

    cuda-checkpoint --get-state --pid P                 prints running|locked|checkpointed|failed
    cuda-checkpoint --action lock --pid P --timeout MS
    cuda-checkpoint --action checkpoint|unlock --pid P
    cuda-checkpoint --action restore --pid P [--device-map OLD=NEW,...]
    cuda-checkpoint --get-restore-tid --pid P           prints the thread id
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence

from kybernate.cuda import procfs
from kybernate.cuda.backend import (
    CudaError,
    CudaLockTimeout,
    CudaState,
    GpuInfo,
    has_checkpoint_state,
    is_identity_map,
    validate_gpu_map,
    validate_pid,
    validate_timeout_ms,
)
from kybernate.errors import FailedPrecondition

_STATE_WORD = re.compile(r"\b(running|locked|checkpointed|failed)\b", re.IGNORECASE)
_TIMEOUT_WORDS = re.compile(r"time(d)?[ -]?out|CUDA_ERROR_TIMEOUT", re.IGNORECASE)
_MIB = 1 << 20
# Slack on top of a lock's own timeout before the tool itself counts as hung.
_TOOL_GRACE_S = 30.0
_DEFAULT_CALL_TIMEOUT_S = 300.0


class CheckpointToolBackend:
    """Drives the `cuda-checkpoint` binary; one subprocess per call."""

    name = "tool"

    def __init__(self, binary: str = "cuda-checkpoint", *, nvidia_smi: str = "nvidia-smi") -> None:
        found = shutil.which(binary)
        if found is None:
            raise FailedPrecondition(f"{binary} not found on PATH")
        self.binary = found
        self.nvidia_smi = shutil.which(nvidia_smi)

    # -- checkpoint state machine --------------------------------------------------------

    def is_cuda_process(self, pid: int) -> bool:
        return has_checkpoint_state(self, pid)

    def get_state(self, pid: int) -> CudaState:
        validate_pid(pid)
        out = self._run(["--get-state", "--pid", str(pid)], pid, "get-state")
        match = _STATE_WORD.search(out)
        if match is None:
            raise CudaError(f"cuda-checkpoint --get-state printed no state: {out.strip()!r}",
                            pid=pid)
        return CudaState[match.group(1).upper()]

    def lock(self, pid: int, timeout_ms: int) -> None:
        validate_pid(pid)
        validate_timeout_ms(timeout_ms)
        argv = ["--action", "lock", "--pid", str(pid), "--timeout", str(timeout_ms)]
        call_timeout = None if timeout_ms == 0 else timeout_ms / 1000 + _TOOL_GRACE_S
        started = time.monotonic()
        try:
            self._run(argv, pid, "lock", timeout_s=call_timeout)
        except CudaError as err:
            elapsed_ms = (time.monotonic() - started) * 1000
            if _TIMEOUT_WORDS.search(err.error_string or "") or (
                    timeout_ms and elapsed_ms >= timeout_ms):
                raise CudaLockTimeout(pid, timeout_ms, err.error_string or "") from None
            raise

    def checkpoint(self, pid: int) -> None:
        validate_pid(pid)
        self._run(["--action", "checkpoint", "--pid", str(pid)], pid, "checkpoint")

    def restore(self, pid: int, gpu_map: Mapping[str, str] | None = None) -> None:
        validate_pid(pid)
        argv = ["--action", "restore", "--pid", str(pid)]
        if gpu_map and not is_identity_map(validate_gpu_map(gpu_map)):
            argv += ["--device-map", device_map_argument(gpu_map)]
        self._run(argv, pid, "restore")

    def unlock(self, pid: int) -> None:
        validate_pid(pid)
        self._run(["--action", "unlock", "--pid", str(pid)], pid, "unlock")

    def restore_thread_id(self, pid: int) -> int:
        validate_pid(pid)
        out = self._run(["--get-restore-tid", "--pid", str(pid)], pid, "get-restore-tid")
        match = re.search(r"\d+", out)
        if match is None:
            raise CudaError(f"cuda-checkpoint --get-restore-tid printed no id: {out.strip()!r}",
                            pid=pid)
        return int(match.group())

    # -- inventory through nvidia-smi ------------------------------------------------------

    def gpus(self) -> list[GpuInfo]:
        rows = self._smi(["--query-gpu=index,uuid,name,memory.total,memory.free"])
        gpus = []
        for row in rows:
            if len(row) != 5:
                raise CudaError(f"nvidia-smi --query-gpu: unexpected row {row!r}")
            index, uuid, model, total, free = row
            gpus.append(GpuInfo(int(index), uuid, model, _mib(total), _mib(free)))
        return gpus

    def driver_version(self) -> str:
        rows = self._smi(["--query-gpu=driver_version"])
        return rows[0][0] if rows else ""

    def process_gpu_memory(self, pid: int) -> dict[str, int]:
        validate_pid(pid)
        usage: dict[str, int] = {}
        for row in self._smi(["--query-compute-apps=pid,gpu_uuid,used_memory"]):
            if len(row) != 3:
                raise CudaError(f"nvidia-smi --query-compute-apps: unexpected row {row!r}")
            if int(row[0]) == pid:
                usage[row[1]] = usage.get(row[1], 0) + _mib(row[2])
        return usage

    def process_gpus(self, pid: int) -> set[str]:
        """GPUs whose device nodes the process holds (minor -> UUID from the kernel
        driver's /proc files), and any where nvidia-smi shows it using memory."""
        validate_pid(pid)
        minors = procfs.held_gpu_minors(pid)
        by_minor = procfs.gpu_uuids_by_minor() if minors else {}
        return {by_minor[m] for m in minors if m in by_minor} | set(self.process_gpu_memory(pid))

    # -- helpers ----------------------------------------------------------------------------

    def _run(self, args: Sequence[str], pid: int, what: str,
             timeout_s: float | None = _DEFAULT_CALL_TIMEOUT_S) -> str:
        argv = [self.binary, *args]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise CudaError(f"cuda-checkpoint {what} did not finish in {timeout_s:.0f} s",
                            pid=pid) from None
        if done.returncode != 0:
            detail = (done.stderr.strip() or done.stdout.strip()
                      or f"exit status {done.returncode}")
            raise CudaError(f"cuda-checkpoint {what} failed", pid=pid, error_name="cuda-checkpoint",
                            error_string=detail)
        return done.stdout

    def _smi(self, query: list[str]) -> list[list[str]]:
        if self.nvidia_smi is None:
            raise FailedPrecondition("nvidia-smi not found on PATH: no GPU inventory")
        done = subprocess.run([self.nvidia_smi, *query, "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise CudaError(f"nvidia-smi failed: {done.stderr.strip() or done.stdout.strip()}")
        return [[cell.strip() for cell in line.split(",")]
                for line in done.stdout.splitlines() if line.strip()]


def device_map_argument(gpu_map: Mapping[str, str]) -> str:
    """`--device-map` value: OLD=NEW pairs joined by commas, UUIDs checked first. Like
    the driver's pairs, it must name every checkpointed GPU."""
    return ",".join(f"{old}={new}" for old, new in validate_gpu_map(gpu_map).items())


def _mib(text: str) -> int:
    try:
        return int(float(text)) * _MIB
    except ValueError:
        raise CudaError(f"nvidia-smi printed {text!r} where MiB were expected") from None
