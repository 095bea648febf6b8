"""Rootfs mounting with real overlay and bind mounts."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from kybernate import mountinfo
from kybernate.errors import Internal, InvalidArgument
from kybernate.protos import mount_pb2
from kybernate.runtime.mount import (
    MS_BIND,
    MS_NODEV,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MountError,
    mount_rootfs,
    parse_options,
    unmount_all,
)


def is_mount_point(path: Path) -> bool:
    return mountinfo.visible_at(mountinfo.read(), str(path)) is not None


@pytest.fixture
def scratch() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix=f"kyb-mount-{os.getpid()}-"))
    try:
        yield root
    finally:
        # Whatever a failed test left mounted goes first, lazily if need be.
        for mount in reversed(mountinfo.read()):
            if mount.mount_point.startswith(str(root)):
                subprocess.run(["umount", "-l", mount.mount_point], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_option_parsing() -> None:
    parsed = parse_options(["ro", "nosuid", "nodev", "rbind", "rprivate", "lowerdir=/a:/b", "index=off"])
    assert parsed.flags == MS_RDONLY | MS_NOSUID | MS_NODEV | MS_BIND | MS_REC
    assert parsed.propagation == MS_PRIVATE | MS_REC
    assert parsed.data == "lowerdir=/a:/b,index=off"
    assert parse_options(["ro", "rw"]).flags == 0
    with pytest.raises(InvalidArgument):
        parse_options(["loop"])


def test_overlay_rootfs_mount_and_unmount(scratch: Path) -> None:
    lower, upper, work, rootfs = (scratch / n for n in ("lower", "upper", "work", "rootfs"))
    for d in (lower, upper, work, rootfs):
        d.mkdir()
    (lower / "from-lower").write_text("layer")
    overlay = mount_pb2.Mount(type="overlay", source="overlay",
                              options=[f"workdir={work}", f"upperdir={upper}", f"lowerdir={lower}"])
    mount_rootfs([overlay], str(rootfs))
    try:
        assert is_mount_point(rootfs)
        assert (rootfs / "from-lower").read_text() == "layer"
        (rootfs / "written").write_text("new")
        assert (upper / "written").read_text() == "new"
        assert not (lower / "written").exists()
    finally:
        unmount_all(str(rootfs))
    assert not is_mount_point(rootfs)
    assert not (rootfs / "from-lower").exists()
    unmount_all(str(rootfs))  # nothing mounted: a no-op


def test_readonly_bind_and_stacked_mounts(scratch: Path) -> None:
    source, rootfs = scratch / "source", scratch / "rootfs"
    source.mkdir()
    rootfs.mkdir()
    (source / "file").write_text("x")
    binds = [mount_pb2.Mount(type="bind", source=str(source), options=["rbind", "rw"]),
             mount_pb2.Mount(type="bind", source=str(source), options=["rbind", "ro"])]
    mount_rootfs(binds, str(rootfs))
    try:
        assert (rootfs / "file").read_text() == "x"
        with pytest.raises(OSError) as denied:
            (rootfs / "other").write_text("y")
        assert denied.value.errno == errno.EROFS
    finally:
        unmount_all(str(rootfs))  # both layers
    assert not is_mount_point(rootfs)


def test_failed_mount_unwinds_what_was_mounted(scratch: Path) -> None:
    source, rootfs = scratch / "source", scratch / "rootfs"
    source.mkdir()
    rootfs.mkdir()
    good = mount_pb2.Mount(type="bind", source=str(source), options=["rbind"])
    bad = mount_pb2.Mount(type="overlay", source="overlay", options=[f"lowerdir={scratch}/missing"])
    with pytest.raises(MountError) as failed:
        mount_rootfs([good, bad], str(rootfs))
    assert failed.value.errno == errno.ENOENT
    assert isinstance(failed.value, Internal) and isinstance(failed.value, OSError)
    assert "missing" in str(failed.value)
    assert not is_mount_point(rootfs)


def test_target_may_not_escape(scratch: Path) -> None:
    rootfs = scratch / "rootfs"
    rootfs.mkdir()
    escaping = mount_pb2.Mount(type="bind", source=str(scratch), target="../../etc", options=["rbind"])
    with pytest.raises(InvalidArgument):
        mount_rootfs([escaping], str(rootfs))


def test_busy_mount_is_detached_lazily(scratch: Path) -> None:
    source, rootfs = scratch / "source", scratch / "rootfs"
    source.mkdir()
    rootfs.mkdir()
    (source / "held").write_text("open")
    mount_rootfs([mount_pb2.Mount(type="bind", source=str(source), options=["rbind"])], str(rootfs))
    holder = subprocess.Popen(["sleep", "30"], cwd=rootfs)  # a cwd inside keeps it busy
    try:
        unmount_all(str(rootfs))
        assert not is_mount_point(rootfs)
        assert Path(f"/proc/{holder.pid}/cwd/held").read_text() == "open"
    finally:
        holder.kill()
        holder.wait()
