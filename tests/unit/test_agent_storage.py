"""The S3 tier against a real S3-compatible HTTP server (moto in server mode)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from kybernate.agent import commit
from kybernate.agent.config import S3Config
from kybernate.agent.registry import Registry, Tier
from kybernate.agent.storage import LocalTier, Promoter, RemoteTier, fetch
from kybernate.errors import DataLoss, NotFound

from tests.support.s3 import S3Server

CREDENTIALS = {"access_key_id": "kyb-test", "secret_access_key": "kyb-test-secret"}


@pytest.fixture
def s3() -> Iterator[S3Server]:
    server = S3Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _config(server: S3Server, bucket: str) -> S3Config:
    return S3Config(bucket=bucket, endpoint_url=server.url, prefix="node-a/", region="us-east-1",
                    max_attempts=2, backoff_base_s=0.05, backoff_max_s=0.1, promote_interval_s=0.3,
                    **CREDENTIALS)


def _committed(local: LocalTier, checkpoint_id: str) -> Path:
    staging = local.staging(checkpoint_id)
    staging.mkdir(parents=True)
    (staging / "pages-1.img").write_bytes(os.urandom(300_000))
    (staging / "core-1.img").write_bytes(b"core")
    final = local.committed(checkpoint_id)
    commit.commit(staging, final, {"id": checkpoint_id, "name": f"name-{checkpoint_id}",
                                   "created_at": "2026-01-01T00:00:00+00:00",
                                   "host": {"criu_version": "4.2.1"}})
    return final


async def _registered(registry: Registry, checkpoint_id: str, final: Path) -> None:
    document = commit.read_metadata(final)
    await registry.add_staging(checkpoint_id, f"name-{checkpoint_id}", container_id="c", namespace="n", image="")
    await registry.mark_committed(checkpoint_id, size_bytes=sum(f["size"] for f in document["files"].values()),
                                  file_count=len(document["files"]),
                                  checksums={k: v["sha256"] for k, v in document["files"].items()}, dirty=True)


async def _wait_until(predicate, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def test_upload_promotes_and_download_restores(tmp_path: Path, s3: S3Server) -> None:
    bucket = f"kyb-{os.getpid()}-a"
    s3.make_bucket(bucket)

    async def scenario() -> None:
        local = LocalTier(tmp_path / "tier")
        local.prepare()
        registry = Registry(tmp_path / "r.db")
        await registry.open()
        remote = RemoteTier(_config(s3, bucket))
        promoter = Promoter(remote, registry, local, _config(s3, bucket))
        promoter.start()
        try:
            final = _committed(local, "ck1")
            await _registered(registry, "ck1", final)
            promoter.enqueue("ck1")

            async def uploaded() -> bool:
                return not (await registry.get("ck1")).dirty
            await _wait_until(uploaded)
            assert (await registry.get("ck1")).tier is Tier.REMOTE
            assert remote.is_complete("ck1")
            assert final.is_dir(), "the local copy stays after upload"

            # Another node: an empty tier, restore by name from the bucket.
            other = LocalTier(tmp_path / "other-tier")
            other.prepare()
            checkpoint_id = remote.resolve_name("name-ck1")
            assert checkpoint_id == "ck1"
            fetched = await fetch(remote, other, checkpoint_id, criu_version="4.2.0")
            assert fetched == other.committed("ck1")
            assert (fetched / "pages-1.img").read_bytes() == (final / "pages-1.img").read_bytes()
            assert commit.verify(fetched)["id"] == "ck1"
            assert not other.leftover_staging()
            with pytest.raises(NotFound):
                remote.resolve_name("no-such-name")
        finally:
            await promoter.stop()
            await registry.close()

    asyncio.run(scenario())


def test_s3_down_keeps_checkpoint_dirty_then_promotes(tmp_path: Path, s3: S3Server) -> None:
    bucket = f"kyb-{os.getpid()}-b"

    async def scenario() -> None:
        local = LocalTier(tmp_path / "tier")
        local.prepare()
        registry = Registry(tmp_path / "r.db")
        await registry.open()
        s3.stop()  # the store is down when the checkpoint commits
        config = _config(s3, bucket)
        remote = RemoteTier(config)
        promoter = Promoter(remote, registry, local, config)
        promoter.start()
        try:
            final = _committed(local, "ck2")
            before = {p.name: p.read_bytes() for p in final.iterdir()}
            await _registered(registry, "ck2", final)
            promoter.enqueue("ck2")
            await asyncio.sleep(1.0)  # several attempts and sweeps against a dead port
            row = await registry.get("ck2")
            assert (row.tier, row.dirty) == (Tier.LOCAL, True)
            assert local.has("ck2")

            s3.start()
            s3.make_bucket(bucket)

            async def promoted() -> bool:
                return not (await registry.get("ck2")).dirty
            await _wait_until(promoted)
            assert remote.is_complete("ck2")
            assert {p.name: p.read_bytes() for p in final.iterdir()} == before, "nothing lost locally"
        finally:
            await promoter.stop()
            await registry.close()

    asyncio.run(scenario())


def test_tampered_remote_object_is_refused(tmp_path: Path, s3: S3Server) -> None:
    bucket = f"kyb-{os.getpid()}-c"
    s3.make_bucket(bucket)
    local = LocalTier(tmp_path / "tier")
    local.prepare()
    final = _committed(local, "ck3")
    remote = RemoteTier(_config(s3, bucket))
    remote.upload(final, "ck3", "name-ck3")
    boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1", aws_access_key_id="x",
                 aws_secret_access_key="y").put_object(Bucket=bucket, Key="node-a/ck3/core-1.img", Body=b"evil")
    other = LocalTier(tmp_path / "other")
    other.prepare()
    with pytest.raises(DataLoss, match="core-1.img"):
        asyncio.run(fetch(remote, other, "ck3", criu_version=None))
    assert not other.has("ck3") and not other.leftover_staging()


def test_incomplete_remote_checkpoint_is_not_found(tmp_path: Path, s3: S3Server) -> None:
    bucket = f"kyb-{os.getpid()}-d"
    s3.make_bucket(bucket)
    remote = RemoteTier(_config(s3, bucket))
    boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1", aws_access_key_id="x",
                 aws_secret_access_key="y").put_object(Bucket=bucket, Key="node-a/ck4/pages-1.img", Body=b"p")
    assert not remote.is_complete("ck4")  # no metadata.json: not a checkpoint
    other = LocalTier(tmp_path / "other")
    other.prepare()
    with pytest.raises(NotFound):
        asyncio.run(fetch(remote, other, "ck4", criu_version=None))
