"""The container's writable layer during a checkpoint: where it is (the upperdir of the
overlay at its root), getting it to the disk as the frozen tasks left it, and saving it
beside the images (`rootfs-diff.tar`) when asked."""

from __future__ import annotations

import asyncio
import ctypes
import os
from pathlib import Path

from kybernate import mountinfo
from kybernate.errors import FailedPrecondition

_LIBC = ctypes.CDLL(None, use_errno=True)


def overlay_upperdir(pid: int) -> Path | None:
    """The upperdir of the overlay mounted at the container's root, if it is one."""
    try:
        upperdir = mountinfo.overlay_upperdir(mountinfo.of_process(pid), "/")
    except OSError:
        return None
    return Path(upperdir) if upperdir is not None else None


def sync_container_fs(pid: int) -> None:
    """syncfs() of the filesystem holding the container's root: its writable layer
    reaches the disk as the frozen tasks left it, without a node-wide sync()."""
    fd = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _LIBC.syncfs(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"syncfs of the root of pid {pid}: {os.strerror(errno)}")
    finally:
        os.close(fd)


async def save_diff(upperdir: Path, archive: Path) -> None:
    """Pack the upperdir (whiteouts and xattrs included) into `archive`."""
    process = await asyncio.create_subprocess_exec(
        "tar", "--xattrs", "--numeric-owner", "-C", str(upperdir), "-cf", str(archive), ".",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, stderr = await process.communicate()
    if process.returncode != 0:
        raise FailedPrecondition(f"saving the rootfs diff of {upperdir} failed: "
                                 f"{stderr.decode(errors='replace').strip()}")
