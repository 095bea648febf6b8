"""Fetch against a real S3-compatible server (moto over HTTP) and the real boto3: durable,
verified, never half-trusted after a crash, one download for concurrent fetches."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kybernate.agent import commit
from kybernate.agent.fetch import Fetcher, fetch_path, remove_leftover_fetches
from kybernate.agent.local_tier import LocalTier
from kybernate.agent.remote import RemoteTier
from kybernate.errors import Cancelled, DataLoss, FailedPrecondition, InvalidArgument, NotFound

from tests.support.checkpoints import committed, tree
from tests.support.s3 import S3Server, s3_config

PART = 5 << 20


def _uploaded(tmp_path: Path, remote: RemoteTier, files: dict[str, bytes] | None = None) -> tuple[str, Path]:
    checkpoint_id, final = committed(LocalTier(tmp_path / "source"), files)
    remote.upload(final, checkpoint_id, namespace="default", name=commit.read_metadata(final)["name"],
                  node="node-a", created_at=datetime.now(UTC))
    return checkpoint_id, final


def _requests(remote: RemoteTier) -> Counter[str]:
    """The client's API calls, by operation (a botocore event hook)."""
    sent: Counter[str] = Counter()
    remote.client.meta.events.register("provide-client-params.s3", lambda model, **_: sent.update([model.name]))
    return sent


def test_fetch_fsyncs_every_file_and_directory_before_the_rename(tmp_path: Path, s3: S3Server, bucket: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    remote = RemoteTier(s3_config(s3, bucket))
    files = {"pages-1.img": os.urandom(PART + 10), "core-1.img": b"core", "sub/deeper/fd.img": b"fd"}
    checkpoint_id, source = _uploaded(tmp_path, remote, files)
    local = LocalTier(tmp_path / "tier")
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src: Any, dst: Any) -> None:
        events.append(("rename", str(src)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    final = asyncio.run(Fetcher(remote, local, criu_version="4.2.0").fetch(checkpoint_id))
    monkeypatch.undo()

    staging = fetch_path(local, checkpoint_id)
    assert final == local.committed(checkpoint_id) and local.has(checkpoint_id)
    assert tree(final) == tree(source)
    renamed = events.index(("rename", str(staging)))
    synced_before = {path for op, path in events[:renamed] if op == "fsync"}
    expected = {str(staging / p.relative_to(final)) for p in final.rglob("*")} | {str(staging)}
    assert expected <= synced_before, expected - synced_before
    assert ("fsync", str(local.root)) in events[renamed:], "the rename itself is made durable"
    assert not staging.exists()


_CRASHING_FETCH = """
import asyncio, json, sys, time
from pathlib import Path
from kybernate.agent.config import S3Config
from kybernate.agent.fetch import Fetcher
from kybernate.agent.remote import RemoteTier
from kybernate.agent.local_tier import LocalTier

config, tier, checkpoint_id = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
remote = RemoteTier(S3Config(**config))
ranges = []

def hold(params, **_):
    # The second range of the big file: half of it is on disk, and the agent dies here.
    if params["Key"].endswith("pages-1.img") and "Range" in params:
        ranges.append(params["Range"])
        if len(ranges) == 2:
            print("halfway", flush=True)
            time.sleep(600)

remote.client.meta.events.register("provide-client-params.s3.GetObject", hold)
asyncio.run(Fetcher(remote, LocalTier(tier), criu_version=None).fetch(checkpoint_id))
"""


@pytest.mark.parametrize("recovery", ["start-up cleanup", "next fetch"])
def test_download_killed_half_way_is_never_trusted(tmp_path: Path, s3: S3Server, bucket: str,
                                                   recovery: str) -> None:
    config = s3_config(s3, bucket, max_concurrency=1)
    remote = RemoteTier(config)
    big = os.urandom(3 * PART)
    checkpoint_id, _ = _uploaded(tmp_path, remote, {"pages-1.img": big, "core-1.img": b"core"})
    local = LocalTier(tmp_path / "tier")
    child = subprocess.Popen([sys.executable, "-c", _CRASHING_FETCH, json.dumps(config.__dict__), str(local.root),
                              checkpoint_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line == "halfway\n", child.communicate()[1]
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.communicate()

    leftover = fetch_path(local, checkpoint_id)
    assert (leftover / "core-1.img").read_bytes() == b"core", "the crash came in the middle of the download"
    assert not local.has(checkpoint_id) and not local.committed(checkpoint_id).exists()
    with pytest.raises(DataLoss, match="metadata.json is missing"):
        commit.verify(leftover)
    assert local.leftover_staging() == [], "a download is never taken for the pipeline's staging"

    if recovery == "start-up cleanup":
        assert remove_leftover_fetches(local) == [leftover]
        assert tree(local.root) == {}
    final = asyncio.run(Fetcher(remote, local, criu_version=None).fetch(checkpoint_id))
    assert (final / "pages-1.img").read_bytes() == big
    assert commit.verify(final)["id"] == checkpoint_id
    assert not leftover.exists()


def test_concurrent_fetches_share_one_download(tmp_path: Path, s3: S3Server, bucket: str) -> None:
    remote = RemoteTier(s3_config(s3, bucket))
    checkpoint_id, _ = _uploaded(tmp_path, remote, {"pages-1.img": os.urandom(PART + 10), "core-1.img": b"c"})
    sent = _requests(remote)

    async def fetch(tier: str, times: int) -> list[Path]:
        fetcher = Fetcher(remote, LocalTier(tmp_path / tier), criu_version=None)
        return list(await asyncio.gather(*(fetcher.fetch(checkpoint_id) for _ in range(times))))

    asyncio.run(fetch("alone", 1))
    one_fetch = Counter(sent)
    sent.clear()
    paths = asyncio.run(fetch("shared", 2))
    assert paths == [tmp_path / "shared" / checkpoint_id] * 2
    assert one_fetch["GetObject"] >= 3, one_fetch  # metadata.json, core, the big file's ranges
    assert sent == one_fetch, "two fetches, one download"


def test_failed_shared_fetch_fails_every_waiter_and_is_not_remembered(tmp_path: Path, s3: S3Server,
                                                                      bucket: str) -> None:
    remote = RemoteTier(s3_config(s3, bucket))
    checkpoint_id, source = committed(LocalTier(tmp_path / "source"))
    fetcher = Fetcher(remote, LocalTier(tmp_path / "tier"), criu_version=None)

    async def two() -> list[Any]:
        return list(await asyncio.gather(fetcher.fetch(checkpoint_id), fetcher.fetch(checkpoint_id),
                                         return_exceptions=True))

    assert [type(e) for e in asyncio.run(two())] == [NotFound, NotFound]
    remote.upload(source, checkpoint_id, namespace="default", name="late", node="node-a",
                  created_at=datetime.now(UTC))
    assert asyncio.run(fetcher.fetch(checkpoint_id)) == tmp_path / "tier" / checkpoint_id


def test_closing_the_remote_tier_cancels_a_download(tmp_path: Path, s3: S3Server, bucket: str) -> None:
    remote = RemoteTier(s3_config(s3, bucket, max_concurrency=1))
    checkpoint_id, _ = _uploaded(tmp_path, remote, {"pages-1.img": os.urandom(2 * PART)})
    local = LocalTier(tmp_path / "tier")
    in_transfer = threading.Event()

    def hold(params: dict[str, Any], **_: Any) -> None:
        if "Range" in params:
            in_transfer.set()
            while not remote.closed:  # until the agent's shutdown has cancelled the transfer
                time.sleep(0.01)

    remote.client.meta.events.register("provide-client-params.s3.GetObject", hold)

    async def scenario() -> None:
        fetch = asyncio.create_task(Fetcher(remote, local, criu_version=None).fetch(checkpoint_id))
        await asyncio.to_thread(in_transfer.wait, 60)
        await asyncio.to_thread(remote.close)
        with pytest.raises(Cancelled):
            await fetch

    asyncio.run(scenario())
    assert tree(local.root) == {}


def test_fetch_never_writes_into_a_directory_that_is_not_a_checkpoint(tmp_path: Path, s3: S3Server,
                                                                     bucket: str) -> None:
    remote = RemoteTier(s3_config(s3, bucket))
    checkpoint_id, _ = _uploaded(tmp_path, remote)
    local = LocalTier(tmp_path / "tier")
    local.committed(checkpoint_id).mkdir(parents=True)
    (local.committed(checkpoint_id) / "pages-1.img").write_bytes(b"half a commit")
    before = tree(local.root)
    with pytest.raises(FailedPrecondition, match="exists but is not a committed checkpoint"):
        asyncio.run(Fetcher(remote, local, criu_version=None).fetch(checkpoint_id))
    assert tree(local.root) == before


def test_remove_leftover_fetches_leaves_everything_else(tmp_path: Path) -> None:
    local = LocalTier(tmp_path / "tier")
    checkpoint_id, _ = committed(local)
    (local.root / ".fetch-a" / "sub").mkdir(parents=True)
    (local.root / ".fetch-a" / "sub" / "pages-1.img.6f2c1a9b").write_bytes(b"half")
    (local.root / ".fetch-b").mkdir()
    local.staging("pipeline").mkdir()
    assert remove_leftover_fetches(local) == [local.root / ".fetch-a", local.root / ".fetch-b"]
    assert sorted(p.name for p in local.root.iterdir()) == sorted([".staging-pipeline", checkpoint_id])
    assert remove_leftover_fetches(LocalTier(tmp_path / "none")) == []


@pytest.mark.parametrize("reference", ["../escape", "20260301T000000Z-01234567/..", ".fetch-x", ""])
def test_fetch_refuses_what_is_not_an_id(tmp_path: Path, s3: S3Server, bucket: str, reference: str) -> None:
    with pytest.raises(InvalidArgument, match="is not a checkpoint id"):
        asyncio.run(Fetcher(RemoteTier(s3_config(s3, bucket)), LocalTier(tmp_path / "tier"),
                            criu_version=None).fetch(reference))
    assert not (tmp_path / "escape").exists() and not (tmp_path / "tier").exists()
