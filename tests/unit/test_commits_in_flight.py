"""The local tier's record of commits in flight: what a restore by name waits for."""

from __future__ import annotations

import asyncio

from kybernate.agent.local_tier import CommitsInFlight

CHECKPOINT = "20261207T043906864528Z-0e230c0e42a6c34b"


def test_the_wider_wait_covers_the_commit_started_inside_it() -> None:
    """The pipeline registers its whole export, thaw and commit first; the commit task
    registered later must not end the wait before the pipeline resolves it."""

    async def scenario() -> list[str]:
        seen: list[str] = []
        commits = CommitsInFlight()
        pipeline: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        commits.add(CHECKPOINT, pipeline)
        commit_task: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        commits.add(CHECKPOINT, commit_task)

        async def restore() -> None:
            assert await commits.wait(CHECKPOINT)
            seen.append("restore went on")

        waiter = asyncio.create_task(restore())
        commit_task.set_result(None)
        await asyncio.sleep(0.01)
        assert commits.running(CHECKPOINT) and not seen, "the commit alone ended the wait"
        seen.append("pipeline done")
        pipeline.set_result(None)
        await waiter
        assert not commits.running(CHECKPOINT)
        return seen

    assert asyncio.run(scenario()) == ["pipeline done", "restore went on"]


def test_nothing_in_flight_returns_at_once() -> None:
    async def scenario() -> bool:
        return await CommitsInFlight().wait(CHECKPOINT)

    assert asyncio.run(scenario()) is False
