"""The remote tier against a real S3-compatible server (moto over HTTP) and the real boto3:
layout, server checksums, multipart with bounded memory, botocore's retries, and
hostile bucket content."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from kybernate.agent import commit
from kybernate.agent.fetch import Fetcher
from kybernate.agent.local_tier import LocalTier
from kybernate.agent.remote import RemoteTier, crc32_base64
from kybernate.errors import DataLoss, FailedPrecondition, NotFound, ResourceExhausted, Unavailable

from tests.support.checkpoints import CRIU_VERSION, committed, tree
from tests.support.s3 import S3Server, s3_config

PART = 5 << 20  # the smallest part S3 allows


def _upload(remote: RemoteTier, final: Path, checkpoint_id: str, *, namespace: str = "default",
            node: str = "node-a", name: str = "", created_at: datetime | None = None) -> None:
    remote.upload(final, checkpoint_id, namespace=namespace, name=name or commit.read_metadata(final)["name"],
                  node=node, created_at=created_at or datetime.now(UTC))


def _keys(s3: S3Server, bucket: str) -> set[str]:
    return {o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])}


def _server_crc(s3: S3Server, bucket: str, key: str) -> dict[str, Any]:
    head = s3.client().head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    return {k: v for k, v in head.items() if k.startswith("Checksum")}


class _Response:
    """The raw body of a stand-in HTTP response that a `before-send` hook returns."""

    def __init__(self, code: str) -> None:
        self._body = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()

    def stream(self, **_: Any) -> Any:
        yield self._body


def test_upload_layout_order_and_server_checksums(tmp_path: Path, s3: S3Server, bucket: str) -> None:
    local = LocalTier(tmp_path / "tier")
    files = {"pages-1.img": os.urandom(300_000), "core-1.img": b"core", "sub/fdinfo-2.img": b"fd"}
    checkpoint_id, final = committed(local, files, name="web")
    remote = RemoteTier(s3_config(s3, bucket))
    puts: list[str] = []
    remote.client.meta.events.register("provide-client-params.s3.PutObject",
                                       lambda params, **_: puts.append(params["Key"]))
    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    _upload(remote, final, checkpoint_id, namespace="team-a", node="node-a", created_at=created)

    base = f"kyb/checkpoints/{checkpoint_id}/"
    index = "kyb/names/team-a/web/node-a"
    assert puts == [base + "core-1.img", base + "pages-1.img", base + "sub/fdinfo-2.img",
                    base + "metadata.json", index], "files, then metadata.json, then the name index"
    assert _keys(s3, bucket) == set(puts)
    for rel, data in [*files.items(), ("metadata.json", (final / "metadata.json").read_bytes())]:
        assert _server_crc(s3, bucket, base + rel)["ChecksumCRC32"] == crc32_base64(data), rel
    body = json.loads(s3.client().get_object(Bucket=bucket, Key=index)["Body"].read())
    assert body == {"id": checkpoint_id, "created_at": created.isoformat()}
    assert remote.is_complete(checkpoint_id)


_CHILD = """
import asyncio, json, sys, tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from kybernate.agent.config import S3Config
from kybernate.agent.fetch import Fetcher
from kybernate.agent.remote import RemoteTier
from kybernate.agent.local_tier import LocalTier

config, directory, checkpoint_id, other = json.loads(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
remote = RemoteTier(S3Config(**config))
tracemalloc.start()
remote.upload(directory, checkpoint_id, namespace="default", name="big", node="node-a", created_at=datetime.now(UTC))
upload_peak = tracemalloc.get_traced_memory()[1]
tracemalloc.reset_peak()
asyncio.run(Fetcher(remote, LocalTier(Path(other)), criu_version=None).fetch(checkpoint_id))
print(json.dumps({"upload_peak": upload_peak, "fetch_peak": tracemalloc.get_traced_memory()[1]}))
"""


def test_multipart_upload_keeps_one_whole_object_checksum_in_bounded_memory(
        tmp_path: Path, s3: S3Server, bucket: str) -> None:
    big = os.urandom(5 * PART + 12_345)
    local = LocalTier(tmp_path / "tier")
    checkpoint_id, final = committed(local, {"pages-1.img": big, "core-1.img": b"core"})
    config = s3_config(s3, bucket, max_concurrency=2)
    # Its own process, so that tracemalloc counts the agent's side alone, not the server's.
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(config.__dict__), str(final), checkpoint_id,
         str(tmp_path / "other")], check=False, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    peaks = json.loads(child.stdout)

    key = f"kyb/checkpoints/{checkpoint_id}/pages-1.img"
    assert s3.client().head_object(Bucket=bucket, Key=key, PartNumber=1)["PartsCount"] == 6
    assert _server_crc(s3, bucket, key) == {"ChecksumCRC32": crc32_base64(big), "ChecksumType": "FULL_OBJECT"}
    assert (tmp_path / "other" / checkpoint_id / "pages-1.img").read_bytes() == big
    # 6 parts, 2 at a time, streamed from and to disk: the process never held two parts.
    assert peaks["upload_peak"] < 2 * PART, peaks
    assert peaks["fetch_peak"] < 2 * PART, peaks


def _fetch_elsewhere(tmp_path: Path, remote: RemoteTier, checkpoint_id: str) -> LocalTier:
    other = LocalTier(tmp_path / "other")
    other.prepare()
    asyncio.run(Fetcher(remote, other, criu_version=None).fetch(checkpoint_id))
    return other


@pytest.mark.parametrize("size", [300_000, 2 * PART + 1], ids=["one-part", "multipart"])
def test_store_corruption_is_caught_by_the_server_checksum(tmp_path: Path, s3: S3Server, bucket: str,
                                                           size: int) -> None:
    checkpoint_id, final = committed(LocalTier(tmp_path / "tier"), {"pages-1.img": os.urandom(size)})
    remote = RemoteTier(s3_config(s3, bucket))
    _upload(remote, final, checkpoint_id)
    s3.rot_stored_object(bucket, f"kyb/checkpoints/{checkpoint_id}/pages-1.img", offset=size // 2)
    # botocore checks a whole-object GET itself; a multipart download is ranged GETs,
    # which only the CRC of the downloaded file can check.
    with pytest.raises(DataLoss, match="pages-1.img.*(did not match|server's checksum)"):
        _fetch_elsewhere(tmp_path, remote, checkpoint_id)
    assert tree(tmp_path / "other") == {}


def test_replaced_object_is_caught_by_metadata_sha256(tmp_path: Path, s3: S3Server, bucket: str) -> None:
    checkpoint_id, final = committed(LocalTier(tmp_path / "tier"))
    remote = RemoteTier(s3_config(s3, bucket))
    _upload(remote, final, checkpoint_id)
    # Another writer replaces a file with one of the same size: the server's checksum
    # is the new content's, so only metadata.json's sha256 shows it.
    s3.client().put_object(Bucket=bucket, Key=f"kyb/checkpoints/{checkpoint_id}/core-1.img", Body=b"evil")
    with pytest.raises(DataLoss, match="core-1.img failed its sha256 check"):
        _fetch_elsewhere(tmp_path, remote, checkpoint_id)
    assert tree(tmp_path / "other") == {}


def test_corrupt_local_copy_is_never_uploaded(tmp_path: Path, s3: S3Server, bucket: str) -> None:
    local = LocalTier(tmp_path / "tier")
    checkpoint_id, final = committed(local)
    pages = final / "pages-1.img"
    data = bytearray(pages.read_bytes())
    data[1000] ^= 1
    pages.write_bytes(bytes(data))
    remote = RemoteTier(s3_config(s3, bucket))
    with pytest.raises(DataLoss, match="pages-1.img failed its sha256 check; not uploading"):
        _upload(remote, final, checkpoint_id)
    assert f"kyb/checkpoints/{checkpoint_id}/pages-1.img" not in _keys(s3, bucket)
    assert not remote.is_complete(checkpoint_id)


def test_a_repeated_upload_sends_only_what_the_bucket_lacks(tmp_path: Path, s3: S3Server, bucket: str) -> None:
    local = LocalTier(tmp_path / "tier")
    checkpoint_id, final = committed(local)
    remote = RemoteTier(s3_config(s3, bucket))
    _upload(remote, final, checkpoint_id)
    s3.client().delete_object(Bucket=bucket, Key=f"kyb/checkpoints/{checkpoint_id}/pages-1.img")
    puts: list[str] = []
    remote.client.meta.events.register("provide-client-params.s3.PutObject",
                                       lambda params, **_: puts.append(params["Key"].rsplit("/", 1)[-1]))
    _upload(remote, final, checkpoint_id)
    assert puts == ["pages-1.img", "node-a"]


@pytest.mark.parametrize("operation, size", [("PutObject", 1000), ("UploadPart", PART + 1),
                                             ("CompleteMultipartUpload", PART + 1)])
@pytest.mark.parametrize("attempts, succeeds", [(3, True), (2, False)])
def test_botocore_retries_each_request(tmp_path: Path, s3: S3Server, bucket: str, operation: str, size: int,
                                       attempts: int, succeeds: bool) -> None:
    local = LocalTier(tmp_path / "tier")
    checkpoint_id, final = committed(local, {"pages-1.img": os.urandom(size)})
    remote = RemoteTier(s3_config(s3, bucket, request_max_attempts=attempts))
    sent: list[int] = []

    def two_failures(request: Any, **_: Any) -> AWSResponse | None:
        # The first request of this kind for pages-1.img (its first part), twice.
        if "pages-1.img" not in request.url or "partNumber=2" in request.url:
            return None
        sent.append(1)
        return AWSResponse(request.url, 503, {}, _Response("SlowDown")) if len(sent) <= 2 else None

    remote.client.meta.events.register(f"before-send.s3.{operation}", two_failures)
    if succeeds:
        _upload(remote, final, checkpoint_id)
        assert remote.is_complete(checkpoint_id)
    else:
        with pytest.raises(Unavailable, match="SlowDown"):
            _upload(remote, final, checkpoint_id)
        assert not remote.is_complete(checkpoint_id)
    assert len(sent) == attempts, "botocore made `request_max_attempts` attempts, the first included"


def test_name_index_keeps_nodes_and_namespaces_apart(tmp_path: Path, s3: S3Server, bucket: str) -> None:
    remote = RemoteTier(s3_config(s3, bucket))
    start = datetime(2026, 3, 1, tzinfo=UTC)

    def upload(node: str, namespace: str, minutes: int) -> str:
        checkpoint_id, final = committed(LocalTier(tmp_path / node), name="golden", namespace=namespace)
        _upload(remote, final, checkpoint_id, namespace=namespace, node=node,
                created_at=start + timedelta(minutes=minutes))
        return checkpoint_id

    on_a, on_b = upload("node-a", "team-a", 1), upload("node-b", "team-a", 2)
    other_team = upload("node-a", "team-b", 3)
    entries = remote.name_entries("team-a", "golden")
    assert {(e.node, e.checkpoint_id) for e in entries} == {("node-a", on_a), ("node-b", on_b)}
    assert remote.resolve_name("team-a", "golden").checkpoint_id == on_b, "the newest across nodes"
    assert remote.resolve_name("team-b", "golden").checkpoint_id == other_team, "newer, but another namespace"

    again_on_a = upload("node-a", "team-a", 4)  # replaces node-a's own entry, never node-b's
    assert {(e.node, e.checkpoint_id) for e in remote.name_entries("team-a", "golden")} == {
        ("node-a", again_on_a), ("node-b", on_b)}
    assert remote.resolve_name("team-a", "golden").checkpoint_id == again_on_a
    with pytest.raises(NotFound, match="no checkpoint named 'silver' in namespace 'team-a'"):
        remote.resolve_name("team-a", "silver")


_ENTRY = {"id": "20260301T000000000000Z-0123456789abcdef", "created_at": "2026-03-01T00:00:00+00:00"}


@pytest.mark.parametrize("node, body", [
    ("node-a", json.dumps({**_ENTRY, "id": "../../etc/passwd"})),
    ("node-a", json.dumps({**_ENTRY, "id": "20260301T000000Z-01234567/../x"})),
    ("node-a", "not json"),
    ("node-a", json.dumps({**_ENTRY, "created_at": "2026-03-01T00:00:00"})),
    ("node-a", json.dumps({**_ENTRY, "pad": "x" * 5000})),
    ("Node_A", json.dumps(_ENTRY)),
    ("node-a/nested", json.dumps(_ENTRY)),
], ids=["parent-id", "id-with-path", "not-json", "naive-time", "oversized", "bad-node", "nested-key"])
def test_hostile_name_index_entry_is_refused(tmp_path: Path, s3: S3Server, bucket: str, node: str,
                                             body: str) -> None:
    s3.client().put_object(Bucket=bucket, Key=f"kyb/names/default/golden/{node}", Body=body.encode())
    remote = RemoteTier(s3_config(s3, bucket))
    with pytest.raises(DataLoss, match=f"name index entry kyb/names/default/golden/{node}"):
        remote.resolve_name("default", "golden")


def _hostile_checkpoint(s3: S3Server, bucket: str, **fields: Any) -> str:
    checkpoint_id = "20260301T000000000000Z-00000000000000aa"
    document = {"format": commit.METADATA_FORMAT, "id": checkpoint_id, "name": "hostile",
                "created_at": "2026-03-01T00:00:00+00:00", "host": {"criu_version": CRIU_VERSION},
                "files": {}, **fields}
    s3.client().put_object(Bucket=bucket, Key=f"kyb/checkpoints/{checkpoint_id}/metadata.json",
                           Body=json.dumps(document).encode(), ChecksumAlgorithm="CRC32")
    return checkpoint_id


_EVIL = {"size": 4, "sha256": hashlib.sha256(b"evil").hexdigest()}


@pytest.mark.parametrize("files, refusal", [
    ({"../outside.img": _EVIL}, "would lead outside"),
    ({"sub/../../outside.img": _EVIL}, "would lead outside"),
    ({"{tmp_path}/outside.img": _EVIL}, "would lead outside"),
    ({"./pages-1.img": _EVIL}, "would lead outside"),
    ({"sub//pages-1.img": _EVIL}, "would lead outside"),
    ({"..\\outside.img": _EVIL}, "would lead outside"),
    ({"pages\0.img": _EVIL}, "is not a relative path"),
    ({"link": _EVIL, "link/through.img": _EVIL}, "listed as a file and as a directory"),
    ({"metadata.json": _EVIL}, "lists metadata.json as one of its own files"),
    ({"pages-1.img": {"size": -1, "sha256": _EVIL["sha256"]}}, "no valid size"),
    ({"pages-1.img": {"size": 4, "sha256": "../x"}}, "no valid sha256"),
], ids=["parent", "nested-parent", "absolute", "dot", "empty-component", "backslash", "nul",
        "file-and-directory", "metadata-itself", "negative-size", "bad-sha256"])
def test_hostile_metadata_file_list_is_refused_before_anything_is_written(
        tmp_path: Path, s3: S3Server, bucket: str, files: dict[str, Any], refusal: str) -> None:
    files = {rel.replace("{tmp_path}", str(tmp_path)): entry for rel, entry in files.items()}
    checkpoint_id = _hostile_checkpoint(s3, bucket, files=files)
    for rel in files:  # the objects it names are in the bucket too, ready to be written
        if "\0" not in rel and rel != "metadata.json":
            s3.client().put_object(Bucket=bucket, Key=f"kyb/checkpoints/{checkpoint_id}/{rel}", Body=b"evil")
    local = LocalTier(tmp_path / "tier")
    local.prepare()
    before = tree(tmp_path)
    with pytest.raises(DataLoss, match=refusal):
        asyncio.run(Fetcher(RemoteTier(s3_config(s3, bucket)), local, criu_version=None).fetch(checkpoint_id))
    assert tree(tmp_path) == before


@pytest.mark.parametrize("fields, error, message", [
    ({"id": "20260301T000000000000Z-00000000000000bb"}, DataLoss, "is that of checkpoint"),
    ({"format": 99}, FailedPrecondition, "metadata format 99"),
    ({"files": ["pages-1.img"]}, DataLoss, "has no file list"),
], ids=["another-id", "another-format", "no-file-list"])
def test_metadata_that_is_not_this_checkpoints_is_refused(tmp_path: Path, s3: S3Server, bucket: str,
                                                          fields: dict[str, Any], error: type, message: str) -> None:
    checkpoint_id = _hostile_checkpoint(s3, bucket, **fields)
    with pytest.raises(error, match=message):
        RemoteTier(s3_config(s3, bucket)).download(checkpoint_id, tmp_path / "target")
    assert not (tmp_path / "target").exists()


def test_object_the_metadata_does_not_describe_is_refused(tmp_path: Path, s3: S3Server, bucket: str) -> None:
    checkpoint_id = _hostile_checkpoint(s3, bucket, files={"pages-1.img": _EVIL, "core-1.img": _EVIL})
    key = f"kyb/checkpoints/{checkpoint_id}/"
    s3.client().put_object(Bucket=bucket, Key=key + "core-1.img", Body=b"evil")
    remote = RemoteTier(s3_config(s3, bucket))
    with pytest.raises(DataLoss, match="pages-1.img is missing from the bucket"):
        remote.download(checkpoint_id, tmp_path / "missing")
    s3.client().put_object(Bucket=bucket, Key=key + "pages-1.img", Body=b"evil, and longer")
    with pytest.raises(DataLoss, match="pages-1.img has 16 bytes; metadata says 4"):
        remote.download(checkpoint_id, tmp_path / "longer")
    # A writer whose objects carry no checksum at all: nothing to check them against.
    s3.client(Config(request_checksum_calculation="when_required")).put_object(
        Bucket=bucket, Key=key + "pages-1.img", Body=b"evil")
    with pytest.raises(DataLoss, match="pages-1.img has no whole-object CRC32"):
        remote.download(checkpoint_id, tmp_path / "unchecked")


def test_download_that_would_not_fit_is_refused(tmp_path: Path, s3: S3Server, bucket: str) -> None:
    local = LocalTier(tmp_path / "tier")
    checkpoint_id, final = committed(local)
    remote = RemoteTier(s3_config(s3, bucket))
    _upload(remote, final, checkpoint_id)
    with pytest.raises(ResourceExhausted, match="needs 300004 bytes; 1000 are free"):
        remote.download(checkpoint_id, tmp_path / "target", max_bytes=1000)
    assert not (tmp_path / "target").exists()


def test_incomplete_remote_checkpoint_is_not_found(tmp_path: Path, s3: S3Server, bucket: str) -> None:
    checkpoint_id = "20260301T000000000000Z-00000000000000cc"
    s3.client().put_object(Bucket=bucket, Key=f"kyb/checkpoints/{checkpoint_id}/pages-1.img", Body=b"p")
    remote = RemoteTier(s3_config(s3, bucket))
    assert not remote.is_complete(checkpoint_id)  # no metadata.json: not a checkpoint
    with pytest.raises(NotFound, match="no metadata.json"):
        remote.download(checkpoint_id, tmp_path / "target")
    assert not (tmp_path / "target").exists()
