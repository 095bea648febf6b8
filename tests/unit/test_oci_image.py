"""Checkpoint images: the layer as tar readers see it, references, and the refusal of
anything in a pulled layer that is not a checkpoint's file."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from kybernate.agent import commit, oci_image
from kybernate.agent.oci_registry import Reference
from kybernate.errors import DataLoss, InvalidArgument


def committed(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    staging, final = tmp_path / ".staging-x", tmp_path / "x"
    staging.mkdir()
    (staging / "pstree.img").write_bytes(b"p" * 1000)
    (staging / "pages-1.img").write_bytes(b"\1" * 5000)
    (staging / "stats-dump").write_bytes(b"s" * 30)
    (staging / "rootfs-diff.tar").write_bytes(b"r" * 700)
    document = commit.commit(staging, final, {"id": "20261207T000000Z-00000001", "name": "n",
                                              "created_at": "2026-12-07T00:00:00+00:00",
                                              "container": {"id": "c1", "namespace": "ns", "image": "img"}})
    return final, document


def test_layer_is_a_tar_checkpointctl_reads(tmp_path: Path) -> None:
    directory, metadata = committed(tmp_path)
    entries = oci_image.archive_entries(directory, metadata)
    data = b"".join(oci_image.layer_chunks(entries, 0))
    assert len(data) == oci_image.layer_size(entries, 0)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        assert tar.getmember("checkpoint").isdir()
        assert json.loads(tar.extractfile("config.dump").read())["id"] == "c1"  # type: ignore[union-attr]
        spec = json.loads(tar.extractfile("spec.dump").read())  # type: ignore[union-attr]
    assert spec["annotations"]["io.kubernetes.cri.container-name"] == "c1"
    assert set(names) == {"checkpoint", "checkpoint/pstree.img", "checkpoint/pages-1.img", "checkpoint/stats-dump",
                          "checkpoint/metadata.json", "config.dump", "spec.dump", "rootfs-diff.tar", "stats-dump"}


def test_unpack_gives_back_the_checkpoint(tmp_path: Path) -> None:
    directory, metadata = committed(tmp_path)
    data = b"".join(oci_image.layer_chunks(oci_image.archive_entries(directory, metadata), 0))
    target = tmp_path / "unpacked"
    target.mkdir()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        oci_image._unpack(tar, target, Reference.parse("r.io/x:y"), limit=len(data) * 4)
    assert commit.verify(target)["id"] == metadata["id"]


def hostile(tmp_path: Path, build: str) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        def add(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        if build == "escape":
            add("checkpoint/../../etc/passwd")
        elif build == "absolute":
            add("/checkpoint/x")
        elif build == "symlink":
            add("checkpoint/pstree.img", kind=tarfile.SYMTYPE, link="/etc/shadow")
        elif build == "hardlink":
            add("checkpoint/pstree.img", kind=tarfile.LNKTYPE, link="etc/shadow")
        elif build == "device":
            add("checkpoint/null", kind=tarfile.CHRTYPE)
        elif build == "twice":
            add("checkpoint/a")
            add("checkpoint/a")
        elif build == "unknown":
            add("run.sh")
        elif build == "bomb":
            add("checkpoint/big", b"\0" * 10_000)
    path = tmp_path / f"{build}.tar"
    path.write_bytes(buffer.getvalue())
    return path


@pytest.mark.parametrize("build, message", [
    ("escape", "outside"), ("absolute", "unexpected"), ("symlink", "not a regular file"),
    ("hardlink", "not a regular file"), ("device", "not a regular file"), ("twice", "twice"),
    ("unknown", "unexpected entry"), ("bomb", "more than")])
def test_hostile_layers_are_refused(tmp_path: Path, build: str, message: str) -> None:
    target = tmp_path / "target"
    target.mkdir()
    with tarfile.open(hostile(tmp_path, build)) as tar, pytest.raises(DataLoss, match=message):
        oci_image._unpack(tar, target, Reference.parse("r.io/x:y"), limit=1000)
    assert not (tmp_path / "etc").exists()


def test_references() -> None:
    ref = Reference.parse("127.0.0.1:5000/team/golden:v1")
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == ("127.0.0.1:5000", "team/golden", "v1", "")
    assert Reference.parse("r.io/x").tag == "latest"
    pinned = Reference.parse("r.io/x@sha256:" + "a" * 64)
    assert pinned.manifest_reference == pinned.digest and not pinned.tag
    for bad in ("x", "http://r.io/x", "r.io/X", "r.io/x:../y", "../x/y", "r.io/x@sha256:zz", "r.io:99999/x"):
        with pytest.raises(InvalidArgument):
            Reference.parse(bad)


def test_checkpoint_layer_validation() -> None:
    ref = Reference.parse("r.io/x:y")
    good = {"layers": [{"mediaType": oci_image.LAYER_TAR, "digest": "sha256:" + "b" * 64, "size": 10}]}
    assert oci_image.checkpoint_layer(good, ref).size == 10
    with pytest.raises(InvalidArgument, match="not one"):
        oci_image.checkpoint_layer({"layers": good["layers"] * 2}, ref)
    with pytest.raises(InvalidArgument, match="not a tar layer"):
        oci_image.checkpoint_layer({"layers": [{**good["layers"][0], "mediaType": "text/plain"}]}, ref)
    with pytest.raises(DataLoss):
        oci_image.checkpoint_layer({"layers": [{**good["layers"][0], "size": -1}]}, ref)
