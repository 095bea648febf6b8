"""Moving all CUDA processes of a container through the checkpoint state machine together.

Every step reads the driver's state first and acts only where the state calls for it,
so a step can be repeated safely: a process a CRIU CUDA plugin already restored is not
restored twice, one the shim's Pause already locked is not locked again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kybernate.cuda.backend import CudaBackend, CudaState, GpuInfo
from kybernate.errors import FailedPrecondition, InvalidArgument, KybernateError, ResourceExhausted

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class ProcessStep:
    """What one step did to one process, for metadata.json and the phase timings."""

    pid: int
    action: str
    before: CudaState
    after: CudaState
    seconds: float
    gpu_memory: dict[str, int] = field(default_factory=dict)  # GPU UUID -> bytes involved
    skipped: bool = False

    @property
    def gpu_memory_bytes(self) -> int:
        return sum(self.gpu_memory.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "action": self.action,
            "before": self.before.name,
            "after": self.after.name,
            "seconds": round(self.seconds, 6),
            "gpu_memory": dict(self.gpu_memory),
            "gpu_memory_bytes": self.gpu_memory_bytes,
            "skipped": self.skipped,
        }


StepReport = dict[int, ProcessStep]


def report_to_json(report: StepReport) -> dict[str, Any]:
    """A step report as metadata.json stores it: per pid, plus the step's total bytes."""
    return {
        "processes": {str(pid): step.to_json() for pid, step in report.items()},
        "gpu_memory_bytes": sum(step.gpu_memory_bytes for step in report.values()),
        "seconds": max((step.seconds for step in report.values()), default=0.0),
    }


class CudaCoordinator:
    """Runs lock, checkpoint, restore and unlock over a set of pids; the backend's calls
    block (the driver waits for the process), so they run in a thread executor."""

    def __init__(self, backend: CudaBackend, *, executor: Executor | None = None) -> None:
        self.backend = backend
        self._executor = executor

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _states(self, pids: Sequence[int]) -> dict[int, CudaState]:
        states = await asyncio.gather(*(self._call(self.backend.get_state, pid) for pid in pids))
        return dict(zip(pids, states))

    async def lock_all(self, pids: Iterable[int], timeout_ms: int) -> StepReport:
        """Lock every RUNNING process, all before anyone checkpoints: a process locked
        alone can deadlock waiting on one still running. If any lock fails, the ones this
        call locked are unlocked again and the failure is raised."""
        order = _unique(pids)
        states = await self._states(order)
        for pid, state in states.items():
            if state not in (CudaState.RUNNING, CudaState.LOCKED):
                raise FailedPrecondition(f"cannot lock CUDA process {pid}: it is {state.name}")
        report: StepReport = {
            pid: ProcessStep(pid, "lock", state, state, 0.0, skipped=True)
            for pid, state in states.items() if state is CudaState.LOCKED
        }
        to_lock = [pid for pid, state in states.items() if state is CudaState.RUNNING]
        memory = await self._memory(to_lock)
        results = await asyncio.gather(
            *(self._timed(self.backend.lock, pid, timeout_ms) for pid in to_lock),
            return_exceptions=True,
        )
        failures: list[tuple[int, BaseException]] = []
        locked: list[int] = []
        for pid, result in zip(to_lock, results):
            if isinstance(result, BaseException):
                failures.append((pid, result))
            else:
                locked.append(pid)
                report[pid] = ProcessStep(pid, "lock", CudaState.RUNNING, CudaState.LOCKED,
                                          result, memory.get(pid, {}))
        if failures:
            await self._roll_back_locks(locked)
            pid, error = failures[0]
            raise _with_pid(error, pid)
        return {pid: report[pid] for pid in order}

    async def _roll_back_locks(self, locked: Sequence[int]) -> None:
        results = await asyncio.gather(*(self._call(self.backend.unlock, pid) for pid in locked),
                                       return_exceptions=True)
        for pid, result in zip(locked, results):
            if isinstance(result, BaseException):
                # The caller kills the container when its CUDA state is unknown; log why.
                log.error("unlock of pid %d after a failed lock_all failed: %s", pid, result)

    async def checkpoint_all(self, pids: Iterable[int]) -> StepReport:
        """LOCKED -> CHECKPOINTED (GPU memory to host); already CHECKPOINTED ones are left."""
        order = _unique(pids)
        states = await self._states(order)
        for pid, state in states.items():
            if state not in (CudaState.LOCKED, CudaState.CHECKPOINTED):
                raise FailedPrecondition(
                    f"cannot checkpoint CUDA process {pid}: it is {state.name}, not LOCKED")
        return await self._step(order, states, "checkpoint", CudaState.LOCKED,
                                CudaState.CHECKPOINTED, self.backend.checkpoint)

    async def restore_all(self, pids: Iterable[int],
                          gpu_map: Mapping[str, str] | None = None) -> StepReport:
        """CHECKPOINTED -> LOCKED; every other state is left as it is (a CRIU CUDA plugin
        may have restored some already, and a second restore would fail)."""
        order = _unique(pids)
        states = await self._states(order)
        mapping = dict(gpu_map) if gpu_map else None
        return await self._step(order, states, "restore", CudaState.CHECKPOINTED,
                                CudaState.LOCKED,
                                lambda pid: self.backend.restore(pid, mapping))

    async def unlock_all(self, pids: Iterable[int]) -> StepReport:
        """LOCKED -> RUNNING. Tries every process even when one fails, then raises the
        first failure; a CHECKPOINTED process must be restored first."""
        order = _unique(pids)
        states = await self._states(order)
        checkpointed = [pid for pid, state in states.items() if state is CudaState.CHECKPOINTED]
        report = await self._step(order, states, "unlock", CudaState.LOCKED, CudaState.RUNNING,
                                  self.backend.unlock)
        if checkpointed:
            raise FailedPrecondition(
                f"cannot unlock CUDA processes {checkpointed}: checkpointed, restore them first")
        return report

    async def _step(self, order: Sequence[int], states: Mapping[int, CudaState], action: str,
                    source: CudaState, target: CudaState,
                    call: Callable[[int], None]) -> StepReport:
        """Run `call` on every pid in `source` concurrently; the others are skipped."""
        todo = [pid for pid in order if states[pid] is source]
        # Bytes on the GPU before a checkpoint, or once restored: read where they are.
        memory_before = await self._memory(todo) if action == "checkpoint" else {}
        results = await asyncio.gather(*(self._timed(call, pid) for pid in todo),
                                       return_exceptions=True)
        report: StepReport = {}
        failures: list[tuple[int, BaseException]] = []
        for pid, result in zip(todo, results):
            if isinstance(result, BaseException):
                failures.append((pid, result))
            else:
                report[pid] = ProcessStep(pid, action, source, target, result,
                                          memory_before.get(pid, {}))
        if action == "restore":
            restored = await self._memory(list(report))
            for pid, step in report.items():
                report[pid] = ProcessStep(pid, action, source, target, step.seconds,
                                          restored.get(pid, {}))
        if failures:
            pid, error = failures[0]
            raise _with_pid(error, pid)
        for pid in order:
            if pid not in report:
                report[pid] = ProcessStep(pid, action, states[pid], states[pid], 0.0,
                                          skipped=True)
        return {pid: report[pid] for pid in order}

    async def _timed(self, call: Callable[..., None], *args: Any) -> float:
        started = time.monotonic()
        await self._call(call, *args)
        return time.monotonic() - started

    async def _memory(self, pids: Sequence[int]) -> dict[int, dict[str, int]]:
        usage = await asyncio.gather(
            *(self._call(self.backend.process_gpu_memory, pid) for pid in pids),
            return_exceptions=True)
        # Usage is for the record only; a failed query must not fail the step.
        return {pid: used for pid, used in zip(pids, usage) if isinstance(used, dict)}

    async def snapshot_inventory(self, pids: Iterable[int]) -> dict[str, Any]:
        """Per checkpointed GPU: index, uuid, model, total memory and the bytes these pids
        hold on it. A GPU counts as checkpointed when any pid's CUDA state covers it,
        memory there or not: a restore that moves anything must name every one."""
        order = _unique(pids)
        gpus = await self._call(self.backend.gpus)
        usage = await self._memory(order)
        found = await asyncio.gather(
            *(self._call(self.backend.process_gpus, pid) for pid in order), return_exceptions=True)
        covered: list[set[str]] = []
        for pid, gpus_of_pid in zip(order, found):
            if isinstance(gpus_of_pid, BaseException):
                # The record then names the GPUs with memory only; a restore that has to
                # move them may be refused by the driver for want of the others.
                log.warning("GPUs of CUDA process %d unknown: %s", pid, gpus_of_pid)
                continue
            covered.append(gpus_of_pid)
        held: dict[str, int] = {}
        for used in usage.values():
            for uuid, size in used.items():
                held[uuid] = held.get(uuid, 0) + size
        checkpointed = set(held).union(*covered)
        return {
            "backend": self.backend.name,
            "gpus": [
                {
                    "index": gpu.index,
                    "uuid": gpu.uuid,
                    "model": gpu.model,
                    "memory_total": gpu.memory_total,
                    "memory_used_by_container": held.get(gpu.uuid, 0),
                }
                for gpu in gpus if gpu.uuid in checkpointed
            ],
            "processes": {str(pid): usage.get(pid, {}) for pid in order},
        }

    def check_restore_fit(self, required: Mapping[str, int],
                          models: Mapping[str, str]) -> dict[str, str]:
        """The GPU map for a restore: empty when every checkpointed GPU is here under its
        own UUID with the memory it needs (the driver then needs no map), else one entry
        for every checkpointed GPU (the driver refuses a map that leaves one out), each
        onto a GPU of this node of the same model with enough free memory, no two onto
        one. Blocking (queries the backend)."""
        plan = plan_gpu_placement(required, models, self.backend.gpus())
        return {} if all(old == new for old, new in plan.items()) else plan


def plan_gpu_placement(required: Mapping[str, int], models: Mapping[str, str],
                       gpus: Sequence[GpuInfo]) -> dict[str, str]:
    """See CudaCoordinator.check_restore_fit: a target for every checkpointed GPU.

    A matching between checkpointed GPUs and this node's GPUs (same model, free memory
    at least the need; one checkpointed GPU per target), built by augmenting paths from
    the identity: each GPU tries its own UUID first, then a free GPU with the most room,
    and takes another's target only where that one can move on. Largest first."""
    missing = [uuid for uuid in required if uuid not in models]
    if missing:
        raise InvalidArgument(f"checkpoint names no GPU model for {', '.join(missing)}")

    def candidates(old: str) -> list[GpuInfo]:
        fitting = [gpu for gpu in gpus
                   if gpu.model == models[old] and gpu.memory_free >= required[old]]
        return sorted(fitting, key=lambda gpu: (gpu.uuid != old, -gpu.memory_free, gpu.index))

    holder: dict[str, str] = {}  # target UUID -> checkpointed UUID placed there

    def place(old: str, visited: set[str]) -> bool:
        options = candidates(old)
        free = next((gpu for gpu in options if gpu.uuid not in holder), None)
        if free is not None:
            holder[free.uuid] = old
            return True
        for gpu in options:  # all taken: move a holder on, if it can go elsewhere
            if gpu.uuid not in visited:
                visited.add(gpu.uuid)
                if place(holder[gpu.uuid], visited):
                    holder[gpu.uuid] = old
                    return True
        return False

    order = sorted(required, key=lambda u: (-required[u], u))
    for old in order:  # own UUIDs first, so that no move displaces a GPU that fits
        if any(gpu.uuid == old for gpu in candidates(old)) and old not in holder:
            holder[old] = old
    for old in order:
        if old in holder.values() or place(old, set()):
            continue
        need, model = required[old], models[old]
        same_model = [gpu for gpu in gpus if gpu.model == model]
        if not same_model:
            raise FailedPrecondition(
                f"no {model} GPU on this node (needed for checkpointed GPU {old})")
        roomiest = max(same_model, key=lambda gpu: (gpu.memory_free, -gpu.index))
        if roomiest.memory_free < need:
            raise ResourceExhausted(f"not enough GPU memory on GPU {roomiest.uuid}: "
                                    f"need {need}, free {roomiest.memory_free}")
        raise ResourceExhausted(f"every {model} GPU of this node with room for {need} bytes "
                                f"is already taken by this restore (checkpointed GPU {old})")
    placed = {old: new for new, old in holder.items()}
    return {old: placed[old] for old in required}


def _unique(pids: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(pids))


def _with_pid(error: BaseException, pid: int) -> BaseException:
    """The error itself if it names the pid already, else the same kind of error that does."""
    if not isinstance(error, KybernateError):
        return error
    if getattr(error, "pid", None) == pid or f"pid {pid}" in str(error):
        return error
    try:
        wrapped = type(error)(f"pid {pid}: {error}")
    except TypeError:  # a subclass with its own constructor; it names what it needs
        return error
    wrapped.__cause__ = error
    return wrapped
