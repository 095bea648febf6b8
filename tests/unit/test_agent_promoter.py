"""The promoter against a real S3-compatible server (moto over HTTP): it uploads what the
registry says is dirty, writes this node's name-index entry, and never loses a
checkpoint: one that cannot be uploaded stays local and dirty."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from kybernate.agent.fetch import Fetcher
from kybernate.agent.local_tier import LocalTier
from kybernate.agent.promoter import Promoter
from kybernate.agent.registry import Registry, Tier
from kybernate.agent.remote import RemoteTier

from tests.support.checkpoints import committed, register, tree
from tests.support.s3 import S3Server, running_s3, s3_config


async def _wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def _uploaded(registry: Registry, checkpoint_id: str) -> bool:
    return not (await registry.get(checkpoint_id)).dirty


def test_promoter_uploads_with_this_nodes_name_entry(tmp_path: Path, s3: S3Server, bucket: str) -> None:
    async def scenario() -> None:
        local = LocalTier(tmp_path / "tier")
        registry = Registry(tmp_path / "r.db")
        await registry.open()
        config = s3_config(s3, bucket)
        remote = RemoteTier(config)
        promoter = Promoter(remote, registry, local, config, node="node-a")
        promoter.start()
        try:
            checkpoint_id, final = committed(local, name="web", namespace="team-a")
            await register(registry, checkpoint_id, final, namespace="team-a")
            promoter.enqueue(checkpoint_id)
            await _wait_until(lambda: _uploaded(registry, checkpoint_id))
            row = await registry.get(checkpoint_id)
            assert row.tier is Tier.REMOTE
            assert local.has(checkpoint_id), "the local copy stays after upload"

            entry = json.loads(s3.client().get_object(Bucket=bucket, Key="kyb/names/team-a/web/node-a")["Body"].read())
            assert entry == {"id": checkpoint_id, "created_at": row.created_at.isoformat()}
            # Another node: an empty tier, restore by name in the namespace from the bucket.
            resolved = await asyncio.to_thread(remote.resolve_name, "team-a", "web")
            assert (resolved.checkpoint_id, resolved.node) == (checkpoint_id, "node-a")
            fetched = await Fetcher(remote, LocalTier(tmp_path / "other"), criu_version="4.2.0").fetch(checkpoint_id)
            assert tree(fetched) == tree(final)
        finally:
            await promoter.stop()
            await registry.close()

    asyncio.run(scenario())


@pytest.fixture
def own_s3() -> Iterator[S3Server]:
    """A server of this test's own, which it stops and starts."""
    with running_s3() as server:
        yield server


def test_s3_down_keeps_checkpoint_dirty_then_promotes(tmp_path: Path, own_s3: S3Server) -> None:
    bucket = f"kyb-{uuid.uuid4().hex[:16]}"

    async def scenario() -> None:
        local = LocalTier(tmp_path / "tier")
        registry = Registry(tmp_path / "r.db")
        await registry.open()
        own_s3.stop()  # the store is down when the checkpoint commits
        config = s3_config(own_s3, bucket)
        remote = RemoteTier(config)
        promoter = Promoter(remote, registry, local, config, node="node-a")
        promoter.start()
        try:
            checkpoint_id, final = committed(local)
            before = tree(final)
            await register(registry, checkpoint_id, final)
            promoter.enqueue(checkpoint_id)
            await asyncio.sleep(1.0)  # several attempts and sweeps against a dead port
            row = await registry.get(checkpoint_id)
            assert (row.tier, row.dirty) == (Tier.LOCAL, True)
            assert local.has(checkpoint_id)

            own_s3.start()
            own_s3.make_bucket(bucket)
            await _wait_until(lambda: _uploaded(registry, checkpoint_id))
            assert remote.is_complete(checkpoint_id)
            assert tree(final) == before, "nothing lost locally"
        finally:
            await promoter.stop()
            await registry.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("fault", ["corrupt local copy", "namespace not a name"])
def test_checkpoint_that_cannot_be_uploaded_stays_local_and_dirty(tmp_path: Path, s3: S3Server, bucket: str,
                                                                  fault: str) -> None:
    async def scenario() -> None:
        local = LocalTier(tmp_path / "tier")
        registry = Registry(tmp_path / "r.db")
        await registry.open()
        config = s3_config(s3, bucket, promote_interval_s=3600.0)
        remote = RemoteTier(config)
        promoter = Promoter(remote, registry, local, config, node="node-a")
        try:
            checkpoint_id, final = committed(local)
            namespace = "../other" if fault == "namespace not a name" else "default"
            await register(registry, checkpoint_id, final, namespace=namespace)
            if fault == "corrupt local copy":
                (final / "core-1.img").write_bytes(b"rot!")
            before = tree(final)
            sent: list[str] = []
            remote.client.meta.events.register("provide-client-params.s3.PutObject",
                                               lambda params, **_: sent.append(params["Key"]))
            assert not await promoter.promote(checkpoint_id)
            row = await registry.get(checkpoint_id)
            assert (row.tier, row.dirty) == (Tier.LOCAL, True)
            assert tree(final) == before
            assert not remote.is_complete(checkpoint_id)
            assert not any(key.endswith(("metadata.json", "core-1.img")) or "/names/" in key for key in sent)
        finally:
            await registry.close()

    asyncio.run(scenario())
