"""The promoter: uploads committed checkpoints to the remote tier in the background.

Nothing is ever lost here: a checkpoint stays local and `dirty` until its upload has
completed and been checked, and the promoter never deletes a local file. botocore
retries each request (its retry mode); the promoter's own backoff covers only an
outage that outlasts those, and a checkpoint that still fails stays dirty for the
periodic sweep (which also runs at start, picking up what a previous agent left).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable

from kybernate.agent.config import S3Config
from kybernate.agent.local_tier import LocalTier
from kybernate.agent.registry import CheckpointState, Registry
from kybernate.agent.remote import RemoteTier
from kybernate.errors import Cancelled, InvalidArgument, KybernateError

log = logging.getLogger(__name__)


class Promoter:
    """One worker, one queue; `start()`, `enqueue()` after each commit, `stop()`."""

    def __init__(self, remote: RemoteTier, registry: Registry, local: LocalTier, config: S3Config, *,
                 node: str, on_uploaded: Callable[[str], Awaitable[None]] | None = None,
                 on_retry: Callable[[], None] | None = None) -> None:
        self._remote = remote
        self._registry = registry
        self._local = local
        self._config = config
        self._node = node
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._random = random.Random()
        self._on_uploaded = on_uploaded
        self._on_retry = on_retry
        #: Why the last upload of a checkpoint that stays dirty failed.
        self.last_errors: dict[str, str] = {}

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name="s3-uploader"),
                       asyncio.create_task(self._sweep(), name="s3-promoter")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def enqueue(self, checkpoint_id: str) -> None:
        if checkpoint_id not in self._queued:
            self._queued.add(checkpoint_id)
            self._queue.put_nowait(checkpoint_id)

    async def sweep_once(self) -> None:
        for row in await self._registry.dirty():
            self.enqueue(row.id)

    async def _sweep(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except Exception:
                log.exception("promoter sweep failed")
            await asyncio.sleep(self._config.promote_interval_s)

    def backoff(self, attempt: int) -> float:
        """Seconds before retry number `attempt` (0-based): exponential, capped, jittered."""
        ceiling = min(self._config.backoff_max_s, self._config.backoff_base_s * (2 ** attempt))
        return self._random.uniform(ceiling / 2, ceiling)

    async def _work(self) -> None:
        while True:
            checkpoint_id = await self._queue.get()
            try:
                await self.promote(checkpoint_id)
            except Exception:
                log.exception("upload of checkpoint %s failed unexpectedly; it stays dirty", checkpoint_id)
            finally:
                self._queued.discard(checkpoint_id)

    async def promote(self, checkpoint_id: str, *, progress: Callable[[int], None] | None = None,
                      on_attempt: Callable[[], None] | None = None) -> bool:
        """Upload one checkpoint now, with the promoter's retries; whether it is uploaded.
        `progress` (called from threads) hears of the bytes sent; `on_attempt` of each
        attempt's start."""
        row = await self._registry.get(checkpoint_id)
        if row.state is not CheckpointState.COMMITTED:
            return False
        if not row.dirty:
            return True
        directory = self._local.committed(checkpoint_id)
        for attempt in range(self._config.max_attempts):
            if on_attempt is not None:
                on_attempt()
            try:
                await asyncio.to_thread(self._remote.upload, directory, row.id, namespace=row.namespace,
                                        name=row.name, node=self._node, created_at=row.created_at,
                                        progress=progress)
            except Cancelled as exc:
                self.last_errors[checkpoint_id] = str(exc)
                return False  # the agent is stopping: the next one's sweep picks it up
            except InvalidArgument as exc:
                self.last_errors[checkpoint_id] = str(exc)
                log.error("checkpoint %s cannot be uploaded and stays dirty: %s", checkpoint_id, exc)
                return False
            except (KybernateError, OSError) as exc:
                self.last_errors[checkpoint_id] = str(exc)
                if attempt + 1 == self._config.max_attempts:
                    log.warning("checkpoint %s stays dirty after %d upload attempts: %s",
                                checkpoint_id, attempt + 1, exc)
                    return False
                delay = self.backoff(attempt)
                if self._on_retry is not None:
                    self._on_retry()
                log.info("upload of checkpoint %s failed (%s); retrying in %.1fs", checkpoint_id, exc, delay)
                await asyncio.sleep(delay)
                continue
            self.last_errors.pop(checkpoint_id, None)
            await self._registry.mark_uploaded(checkpoint_id)
            log.info("checkpoint %s uploaded to %s", checkpoint_id, self._remote.url)
            if self._on_uploaded is not None:
                await self._on_uploaded(checkpoint_id)
            return True
        return False
