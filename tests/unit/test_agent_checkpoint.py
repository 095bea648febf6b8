"""Pure parts of the checkpoint pipeline: finding the writable layer."""

from __future__ import annotations

from pathlib import Path

from kybernate.agent.checkpoint import upperdir_from_mountinfo

OVERLAY_ROOT = (
    "1200 1100 0:77 / / rw,relatime master:1 - overlay overlay "
    "rw,lowerdir=/var/lib/containerd/s/1/fs,upperdir=/var/lib/containerd/s/2\\040x/fs,workdir=/w\n"
    "1201 1200 0:78 / /proc rw,nosuid - proc proc rw\n"
)


def test_upperdir_of_overlay_root() -> None:
    assert upperdir_from_mountinfo(OVERLAY_ROOT) == Path("/var/lib/containerd/s/2 x/fs")


def test_last_root_mount_wins() -> None:
    bind_over = OVERLAY_ROOT + "1300 1200 8:1 /rootfs / rw - ext4 /dev/sda1 rw\n"
    assert upperdir_from_mountinfo(bind_over) is None


def test_no_overlay_no_upperdir() -> None:
    assert upperdir_from_mountinfo("1 0 8:1 / / rw - ext4 /dev/sda1 rw\n") is None
    assert upperdir_from_mountinfo("") is None
