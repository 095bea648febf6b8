"""Lazy restore: the task runs before its memory has arrived.

CRIU's lazy pages: `runc restore --lazy-pages` restores everything but the contents
of the private anonymous memory, registers that memory with userfaultfd and hands
the descriptors to a lazy-pages daemon (`criu lazy-pages`, listening on
`lazy-pages.socket` in the restore's work directory). The restored tasks run at
once; a page they touch is faulted in by the daemon from the pages images, and the
daemon copies the rest in the background. It exits 0 once every page is in.

The daemon is the restored process's memory until then: if it dies, or exits with
an error, before that, the process blocks on the next missing page forever. So the
shim supervises it (`LazyPagesDaemon.supervise`): any other end than exit 0 kills
everything in the container's cgroup, and the reaper publishes the init's exit as
for any container that died.

Integrity: the daemon serves pages straight from the images, so it starts only on
a directory the agent verified in full: sealed (`kybernate.agent.seal`), or hashed
before PrepareRestore returned (the agent never defers the hash of a lazy restore).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from kybernate.errors import FailedPrecondition
from kybernate.runtime.reaper import Reaper

log = logging.getLogger(__name__)

SOCKET_NAME = "lazy-pages.socket"
LOG_NAME = "lazy-pages.log"
START_TIMEOUT_S = 10.0
POLL_S = 0.005


class LazyPagesDaemon:
    """One `criu lazy-pages` for one restore."""

    def __init__(self, reaper: Reaper, images: Path, work: Path, *, criu: str = "criu") -> None:
        self._reaper = reaper
        self._images = images
        self._work = work
        self._criu = criu
        self.pid = 0

    @property
    def log_path(self) -> Path:
        return self._work / LOG_NAME

    def _last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        errors = [line for line in lines if "Error" in line or "error" in line]
        return (errors or lines or [""])[-1]

    async def start(self) -> None:
        """Start the daemon and wait until it listens for the restore."""
        self._work.mkdir(parents=True, exist_ok=True)
        socket_path = self._work / SOCKET_NAME
        socket_path.unlink(missing_ok=True)
        child = self._reaper.spawn([self._criu, "lazy-pages", "--images-dir", str(self._images),
                                    "--work-dir", str(self._work), "--log-file", LOG_NAME,
                                    # -v4 writes a line per fault and per transfer: on the
                                    # path of every page the task waits for.
                                    "-v2"])
        self.pid = child.pid
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
        while not socket_path.exists():
            if self._reaper.exited(self.pid) is not None:
                raise FailedPrecondition(f"criu lazy-pages exited before it listened: {self._last_log_line()}")
            if asyncio.get_running_loop().time() > deadline:
                await self.stop()
                raise FailedPrecondition(f"criu lazy-pages did not listen within {START_TIMEOUT_S:.0f}s")
            await asyncio.sleep(POLL_S)

    async def supervise(self, on_failure: Callable[[str], Awaitable[None]]) -> int:
        """Wait for the daemon's exit; anything but 0 calls `on_failure` with the reason.
        Returns the exit status."""
        exit_ = await self._reaper.wait_for(self.pid)
        if exit_.status != 0:
            reason = (f"criu lazy-pages (pid {self.pid}) ended with status {exit_.status} before every page"
                      f" was in" + (f": {line}" if (line := self._last_log_line()) else ""))
            await on_failure(reason)
        return exit_.status

    async def stop(self) -> None:
        """Kill the daemon (the restore it was started for failed)."""
        if self.pid and self._reaper.exited(self.pid) is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            await self._reaper.wait_for(self.pid, timeout=10)
