"""Per-node concurrency limits: one dump per GPU at a time, and a host-memory budget
that all dumps in flight share (a checkpointed GPU's memory lands in host memory,
and CRIU reads the whole address space)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable


class MemoryBudget:
    """A byte-counting semaphore. A request larger than the whole budget is clamped
    to it, so it still runs, alone."""

    def __init__(self, total_bytes: int) -> None:
        if total_bytes <= 0:
            raise ValueError("memory budget must be positive")
        self.total = total_bytes
        self._available = total_bytes
        self._changed = asyncio.Condition()

    @property
    def available(self) -> int:
        return self._available

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int) -> AsyncIterator[int]:
        amount = max(0, min(nbytes, self.total))
        async with self._changed:
            await self._changed.wait_for(lambda: self._available >= amount)
            self._available -= amount
        try:
            yield amount
        finally:
            async with self._changed:
                self._available += amount
                self._changed.notify_all()


class GpuSlots:
    """One lock per GPU UUID; a dump holds the locks of every GPU it touches,
    taken in sorted order so two dumps never deadlock."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def hold(self, gpu_uuids: Iterable[str]) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for uuid in sorted(set(gpu_uuids)):
                await stack.enter_async_context(self._locks.setdefault(uuid, asyncio.Lock()))
            yield


class CheckpointLimits:
    def __init__(self, memory_budget_bytes: int) -> None:
        self.memory = MemoryBudget(memory_budget_bytes)
        self.gpus = GpuSlots()
        self.in_flight = 0

    @contextlib.asynccontextmanager
    async def admit(self, gpu_uuids: Iterable[str], memory_bytes: int) -> AsyncIterator[None]:
        async with self.gpus.hold(gpu_uuids), self.memory.hold(memory_bytes):
            yield
