"""Reaper: real children, real signals, real orphans."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
from kybernate.errors import DeadlineExceeded
from kybernate.runtime.reaper import Reaper, exit_code_from_wait_status

from tests.support import runc_sandbox

T = TypeVar("T")


def with_reaper(body: Callable[[Reaper], Awaitable[T]]) -> T:
    """Run `body` with a started reaper that keeps a small exit history."""
    return runc_sandbox.with_reaper(body, timeout=20, exit_history=64)


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("PPid:"))


def test_wait_status_translation() -> None:
    assert exit_code_from_wait_status(3 << 8) == 3
    assert exit_code_from_wait_status(signal.SIGKILL) == 128 + signal.SIGKILL
    assert exit_code_from_wait_status(0) == 0


def test_run_reports_exit_codes_and_signals() -> None:
    async def body(reaper: Reaper) -> None:
        ok = await reaper.run(["sh", "-c", "exit 7"])
        assert ok.returncode == 7
        killed = await reaper.run(["sh", "-c", "kill -TERM $$"])
        assert killed.returncode == 128 + signal.SIGTERM

    with_reaper(body)


def test_run_collects_output_and_feeds_input() -> None:
    async def body(reaper: Reaper) -> None:
        big = os.urandom(300_000)  # larger than a pipe buffer both ways
        result = await reaper.run(
            [sys.executable, "-c",
             ("import sys; d=sys.stdin.buffer.read(); sys.stdout.buffer.write(d[::-1]);"
              "sys.stderr.write('n=%d' % len(d))")],
            input=big,
        )
        assert result.returncode == 0
        assert result.stdout == big[::-1]
        assert result.stderr == b"n=300000"

    with_reaper(body)


def test_wait_for_after_the_exit_was_reaped() -> None:
    async def body(reaper: Reaper) -> None:
        child = reaper.spawn(["sh", "-c", "exit 5"])
        # Let SIGCHLD be handled before anyone asks for this pid.
        for _ in range(200):
            if reaper.exited(child.pid) is not None:
                break
            await asyncio.sleep(0.01)
        gc.collect()  # a Popen finalizer must not have waited for it either
        exit_ = await reaper.wait_for(child.pid, timeout=5)
        assert exit_.pid == child.pid
        assert exit_.status == 5
        assert exit_.at.tzinfo is not None

    with_reaper(body)


def test_subscriptions_see_every_exit_in_order() -> None:
    async def body(reaper: Reaper) -> None:
        first, second = reaper.subscribe(), reaper.subscribe()
        pids = [reaper.spawn(["sleep", f"0.{i}"]).pid for i in (1, 3, 5)]

        async def collect(sub) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
            seen = []
            async for exit_ in sub:
                if exit_.pid in pids:
                    seen.append((exit_.pid, exit_.status))
                if len(seen) == len(pids):
                    sub.close()
            return seen

        a, b = await asyncio.gather(collect(first), collect(second))
        assert a == b == [(pid, 0) for pid in pids]

    with_reaper(body)


def test_closed_subscription_ends_iteration() -> None:
    async def body(reaper: Reaper) -> None:
        sub = reaper.subscribe()
        asyncio.get_running_loop().call_later(0.05, sub.close)
        assert [e async for e in sub] == []
        # A closed subscription receives nothing further.
        await reaper.run(["true"])
        assert [e async for e in sub] == []

    with_reaper(body)


def test_orphaned_grandchild_is_reaped_as_subreaper() -> None:
    async def body(reaper: Reaper) -> None:
        # The shell exits at once; its background child is re-parented to us.
        result = await reaper.run(["sh", "-c", "(sleep 0.3; exit 9) >/dev/null 2>&1 & echo $!"])
        orphan = int(result.stdout)
        assert parent_pid(orphan) == os.getpid()
        exit_ = await reaper.wait_for(orphan, timeout=5)
        assert exit_.status == 9
        assert not os.path.exists(f"/proc/{orphan}")  # no zombie left

    with_reaper(body)


def test_run_timeout_kills_the_command() -> None:
    async def body(reaper: Reaper) -> None:
        sub = reaper.subscribe()
        with pytest.raises(DeadlineExceeded):
            await reaper.run(["sleep", "30"], timeout=0.2)
        exit_ = await asyncio.wait_for(sub.__anext__(), 5)
        assert exit_.status == 128 + signal.SIGKILL
        sub.close()

    with_reaper(body)


def test_wait_for_times_out_for_a_live_child() -> None:
    async def body(reaper: Reaper) -> None:
        child = reaper.spawn(["sleep", "5"])
        try:
            with pytest.raises(DeadlineExceeded):
                await reaper.wait_for(child.pid, timeout=0.1)
        finally:
            os.kill(child.pid, signal.SIGKILL)
        exit_ = await reaper.wait_for(child.pid, timeout=5)
        assert exit_.status == 128 + signal.SIGKILL

    with_reaper(body)


def test_exit_history_is_bounded() -> None:
    async def body(reaper: Reaper) -> None:
        pids = []
        for _ in range(70):
            child = reaper.spawn(["true"])
            await reaper.wait_for(child.pid, timeout=5)
            pids.append(child.pid)
        assert reaper.exited(pids[-1]) is not None
        assert sum(reaper.exited(pid) is not None for pid in pids) == 64

    with_reaper(body)


def test_no_exit_is_stolen_by_popen_bookkeeping() -> None:
    # Stock Popen polls (waitpid) a dropped child in __del__ and again from later
    # Popen() calls; with it, nearly every one of these exits would be lost.
    async def body(reaper: Reaper) -> None:
        pids = []
        for _ in range(30):
            pids.append(reaper.spawn(["true"]).pid)
            time.sleep(0.01)  # noqa: ASYNC251 - the loop must not run: exits pile up unreaped
        gc.collect()
        exits = [await reaper.wait_for(pid, timeout=5) for pid in pids]
        assert [e.status for e in exits] == [0] * 30

    with_reaper(body)
