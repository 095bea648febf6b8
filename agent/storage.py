"""Storage tiers: the local checkpoint directory and the remote S3-compatible store,
and the background promoter that moves committed checkpoints from one to the other.

Remote layout under `<prefix>`: `<id>/<file>` for every checkpoint file, uploaded
first, then `<id>/metadata.json` (a remote checkpoint is complete iff that object
exists), then `names/<name>` holding the id, so another node can restore by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from kybernate.agent import commit, naming
from kybernate.agent.config import S3Config
from kybernate.agent.registry import Registry
from kybernate.errors import DataLoss, NotFound, Unavailable

log = logging.getLogger(__name__)

_SHA256_META = "sha256"


class LocalTier:
    """The directory every checkpoint commits to first."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def staging(self, checkpoint_id: str) -> Path:
        return commit.staging_path(self.root, checkpoint_id)

    def committed(self, checkpoint_id: str) -> Path:
        return commit.committed_path(self.root, checkpoint_id)

    def has(self, checkpoint_id: str) -> bool:
        return (self.committed(checkpoint_id) / commit.METADATA_FILE).is_file()

    def leftover_staging(self) -> list[tuple[str, Path]]:
        """(id, path) of every staging directory: each is a checkpoint that never committed."""
        if not self.root.is_dir():
            return []
        return sorted(
            (p.name[len(commit.STAGING_PREFIX):], p)
            for p in self.root.iterdir() if p.name.startswith(commit.STAGING_PREFIX)
        )

    def committed_ids(self) -> list[str]:
        """Ids of every committed checkpoint directory (metadata.json present)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if naming.is_checkpoint_id(p.name) and self.has(p.name))

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free


class RemoteTier:
    """An S3 bucket through boto3. Every method blocks; call from a thread."""

    def __init__(self, config: S3Config) -> None:
        import boto3  # only the agent pays for boto3, and only with a remote tier
        from botocore.config import Config

        self.config = config
        # Our own promoter retries with backoff; botocore's retries would hide an
        # outage behind long stalls.
        self._client: Any = boto3.client(
            "s3",
            endpoint_url=config.endpoint_url,
            region_name=config.region,
            aws_access_key_id=config.access_key_id,
            aws_secret_access_key=config.secret_access_key,
            config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=3, read_timeout=60),
        )

    @property
    def url(self) -> str:
        return self.config.url

    def _key(self, *parts: str) -> str:
        return self.config.prefix + "/".join(parts)

    def _wrap(self, what: str, exc: Exception) -> Exception:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                return NotFound(f"{self.url}: {what}: not found")
            return Unavailable(f"{self.url}: {what}: {code or exc}")
        # boto3's transfer manager wraps failures in its own S3UploadFailedError.
        if isinstance(exc, BotoCoreError | Boto3Error):
            return Unavailable(f"{self.url}: {what}: {exc}")
        return exc

    def upload(self, directory: Path, checkpoint_id: str, name: str) -> None:
        """Upload a committed checkpoint, metadata.json last, and check every object."""
        document = commit.read_metadata(directory)
        files: dict[str, dict[str, Any]] = document["files"]
        try:
            for rel, entry in sorted(files.items()):
                key = self._key(checkpoint_id, rel)
                self._client.upload_file(str(directory / rel), self.config.bucket, key,
                                         ExtraArgs={"Metadata": {_SHA256_META: entry["sha256"]}})
                self._check_object(key, rel, entry["size"], entry["sha256"])
            meta_path = directory / commit.METADATA_FILE
            meta_key = self._key(checkpoint_id, commit.METADATA_FILE)
            meta_sha = commit.sha256_file(meta_path)
            self._client.upload_file(str(meta_path), self.config.bucket, meta_key,
                                     ExtraArgs={"Metadata": {_SHA256_META: meta_sha}})
            self._check_object(meta_key, commit.METADATA_FILE, meta_path.stat().st_size, meta_sha)
            self._client.put_object(Bucket=self.config.bucket, Key=self._key("names", name),
                                    Body=checkpoint_id.encode())
        except (NotFound, DataLoss):
            raise
        except Exception as exc:
            raise self._wrap(f"upload of checkpoint {checkpoint_id}", exc) from exc

    def _check_object(self, key: str, rel: str, size: int, sha256: str) -> None:
        head = self._client.head_object(Bucket=self.config.bucket, Key=key)
        if head["ContentLength"] != size or head.get("Metadata", {}).get(_SHA256_META) != sha256:
            raise DataLoss(f"{self.url}: uploaded {rel} does not match the local file"
                           f" ({head['ContentLength']} bytes, expected {size})")

    def is_complete(self, checkpoint_id: str) -> bool:
        try:
            self._client.head_object(Bucket=self.config.bucket, Key=self._key(checkpoint_id, commit.METADATA_FILE))
            return True
        except Exception as exc:
            err = self._wrap(f"checkpoint {checkpoint_id}", exc)
            if isinstance(err, NotFound):
                return False
            raise err from exc

    def resolve_name(self, name: str) -> str:
        """The id a checkpoint name points to in the bucket."""
        try:
            body = self._client.get_object(Bucket=self.config.bucket, Key=self._key("names", name))["Body"]
            return body.read().decode().strip()
        except Exception as exc:
            raise self._wrap(f"checkpoint name {name!r}", exc) from exc

    def download(self, checkpoint_id: str, target: Path) -> None:
        """Fetch a complete remote checkpoint into `target` (a staging dir), metadata last."""
        try:
            meta_obj = self._client.get_object(Bucket=self.config.bucket,
                                               Key=self._key(checkpoint_id, commit.METADATA_FILE))
            meta_bytes = meta_obj["Body"].read()
            files = json.loads(meta_bytes)["files"]
            target.mkdir(parents=True, exist_ok=False, mode=0o700)
            for rel in sorted(files):
                path = target / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                self._client.download_file(self.config.bucket, self._key(checkpoint_id, rel), str(path))
            # Last, as on upload: a local copy without it is not a checkpoint.
            with (target / commit.METADATA_FILE).open("wb") as f:
                f.write(meta_bytes)
                f.flush()
                os.fsync(f.fileno())
        except (NotFound, DataLoss):
            raise
        except Exception as exc:
            raise self._wrap(f"download of checkpoint {checkpoint_id}", exc) from exc


class Promoter:
    """Uploads committed checkpoints in the background: one worker, one queue.

    Each checkpoint is tried `max_attempts` times with exponential backoff and
    jitter; one that still fails stays `dirty` and is queued again by the
    periodic sweep (which also runs at start, picking up what a previous agent
    left). Local files are never deleted by the promoter.
    """

    def __init__(self, remote: RemoteTier, registry: Registry, local: LocalTier, config: S3Config,
                 on_uploaded: Callable[[str], Awaitable[None]] | None = None) -> None:
        self._remote = remote
        self._registry = registry
        self._local = local
        self._config = config
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._random = random.Random()
        self._on_uploaded = on_uploaded

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
                await self._promote(checkpoint_id)
            except Exception:
                log.exception("upload of checkpoint %s failed unexpectedly", checkpoint_id)
            finally:
                self._queued.discard(checkpoint_id)

    async def _promote(self, checkpoint_id: str) -> None:
        row = await self._registry.get(checkpoint_id)
        if not row.dirty:
            return
        directory = self._local.committed(checkpoint_id)
        for attempt in range(self._config.max_attempts):
            try:
                await asyncio.to_thread(self._remote.upload, directory, checkpoint_id, row.name)
            except (Unavailable, NotFound, DataLoss, OSError) as exc:
                if attempt + 1 == self._config.max_attempts:
                    log.warning("checkpoint %s stays dirty after %d upload attempts: %s",
                                checkpoint_id, attempt + 1, exc)
                    return
                delay = self.backoff(attempt)
                log.info("upload of checkpoint %s failed (%s); retrying in %.1fs", checkpoint_id, exc, delay)
                await asyncio.sleep(delay)
                continue
            await self._registry.mark_uploaded(checkpoint_id)
            log.info("checkpoint %s uploaded to %s", checkpoint_id, self._remote.url)
            if self._on_uploaded is not None:
                await self._on_uploaded(checkpoint_id)
            return


async def fetch(remote: RemoteTier, local: LocalTier, checkpoint_id: str, *, criu_version: str | None) -> Path:
    """Download a remote checkpoint into the local tier: staging, verify, rename."""
    if local.has(checkpoint_id):
        return local.committed(checkpoint_id)
    staging = local.staging(checkpoint_id)
    if staging.exists():
        await asyncio.to_thread(shutil.rmtree, staging)
    try:
        await asyncio.to_thread(remote.download, checkpoint_id, staging)
        await asyncio.to_thread(commit.verify, staging, criu_version=criu_version)
        final = local.committed(checkpoint_id)
        await asyncio.to_thread(os.rename, staging, final)
        return final
    finally:
        if staging.exists():
            await asyncio.to_thread(shutil.rmtree, staging, True)
