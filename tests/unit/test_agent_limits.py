"""Concurrency limits: one dump per GPU, a shared host-memory budget."""

from __future__ import annotations

import asyncio

from kybernate.agent.limits import CheckpointLimits, MemoryBudget


def test_memory_budget_waits_for_room_and_clamps_oversize() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(100)
        order: list[str] = []

        async def job(name: str, size: int, hold: float) -> None:
            async with budget.hold(size):
                order.append(f"+{name}")
                await asyncio.sleep(hold)
                order.append(f"-{name}")

        first = asyncio.create_task(job("a", 70, 0.1))
        await asyncio.sleep(0.01)
        await asyncio.gather(first, job("b", 50, 0))
        assert order == ["+a", "-a", "+b", "-b"], "b had to wait for a's memory"
        assert budget.available == 100
        async with budget.hold(10_000) as taken:  # bigger than the node: runs alone
            assert taken == 100 and budget.available == 0
        assert budget.available == 100

    asyncio.run(scenario())


def test_one_dump_per_gpu_others_in_parallel() -> None:
    async def scenario() -> None:
        limits = CheckpointLimits(1 << 30)
        active: dict[str, int] = {}
        peak: dict[str, int] = {}

        async def dump(gpus: list[str]) -> None:
            async with limits.admit(gpus, 1):
                for gpu in gpus:
                    active[gpu] = active.get(gpu, 0) + 1
                    peak[gpu] = max(peak.get(gpu, 0), active[gpu])
                await asyncio.sleep(0.02)
                for gpu in gpus:
                    active[gpu] -= 1

        started = asyncio.get_running_loop().time()
        await asyncio.gather(dump(["g1"]), dump(["g1", "g2"]), dump(["g2", "g1"]), dump(["g3"]), dump([]))
        assert peak == {"g1": 1, "g2": 1, "g3": 1}
        assert asyncio.get_running_loop().time() - started < 0.5  # no deadlock on opposite orders

    asyncio.run(scenario())
