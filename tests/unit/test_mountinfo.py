"""The one mountinfo parser: escapes, optional fields, what shows at a mount point."""

from __future__ import annotations

import os

from kybernate import mountinfo

OVERLAY_ROOT = (
    "1200 1100 0:77 / / rw,relatime master:1 - overlay overlay "
    "rw,lowerdir=/var/lib/containerd/s/1/fs,upperdir=/var/lib/containerd/s/2\\040x/fs,workdir=/w\n"
    "1201 1200 0:78 / /proc rw,nosuid - proc proc rw\n"
)


def test_upperdir_of_overlay_root() -> None:
    assert mountinfo.overlay_upperdir(mountinfo.parse(OVERLAY_ROOT), "/") == "/var/lib/containerd/s/2 x/fs"


def test_last_mount_at_a_point_wins() -> None:
    bind_over = OVERLAY_ROOT + "1300 1200 8:1 /rootfs / rw - ext4 /dev/sda1 rw\n"
    assert mountinfo.overlay_upperdir(mountinfo.parse(bind_over), "/") is None
    assert mountinfo.visible_at(mountinfo.parse(bind_over), "/").fstype == "ext4"  # type: ignore[union-attr]


def test_no_overlay_no_upperdir() -> None:
    assert mountinfo.overlay_upperdir(mountinfo.parse("1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"), "/") is None
    assert mountinfo.overlay_upperdir(mountinfo.parse(""), "/") is None
    assert mountinfo.overlay_upperdir(mountinfo.parse(OVERLAY_ROOT), "/elsewhere") is None


def test_every_octal_escape_is_decoded() -> None:
    # The kernel escapes space, tab, newline and backslash in paths; overlayfs also
    # ',' and '=' inside its option values (\054, \075).
    line = ("40 1 0:50 /a\\134b /mnt/with\\040space\\011tab\\012nl rw shared:1 master:2 - overlay none "
            "rw,upperdir=/u/a\\054b\\075c,workdir=/w\n")
    (mount,) = mountinfo.parse(line)
    assert mount.root == "/a\\b"
    assert mount.mount_point == "/mnt/with space\ttab\nnl"
    assert mount.fstype == "overlay" and mount.source == "none"
    assert mount.super_options == ("rw", "upperdir=/u/a,b=c", "workdir=/w")
    assert mount.super_option("upperdir") == "/u/a,b=c"
    assert mount.super_option("lowerdir") is None


def test_unescape_leaves_what_is_not_an_escape() -> None:
    assert mountinfo.unescape("plain") == "plain"
    assert mountinfo.unescape("a\\") == "a\\"
    assert mountinfo.unescape("a\\08x") == "a\\08x"
    assert mountinfo.unescape("\\040\\040") == "  "


def test_lines_that_are_not_mounts_are_skipped() -> None:
    text = "garbage\n1 0 8:1 / / rw\n2 1 8:1 / /x rw - ext4\n3 1 8:1 / /y rw - ext4 /dev/sda1 rw\n"
    assert [m.mount_point for m in mountinfo.parse(text)] == ["/y"]


def test_a_mount_point_named_like_the_separator() -> None:
    (mount,) = mountinfo.parse("5 1 0:9 / - rw - tmpfs tmpfs rw\n")
    assert mount.mount_point == "-" and mount.fstype == "tmpfs"


def test_this_process_sees_proc() -> None:
    proc = mountinfo.visible_at(mountinfo.read(), "/proc")
    assert proc is not None and proc.fstype == "proc"
    assert mountinfo.visible_at(mountinfo.of_process(os.getpid()), "/proc") is not None
