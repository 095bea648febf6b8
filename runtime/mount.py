"""Mounting the rootfs containerd describes in CreateTaskRequest.rootfs.

Each `containerd.types.Mount` is (type, source, target, options). Options that are
mount(2) flags (ro, nosuid, bind, rbind, ...) become flags, propagation options
(rprivate, shared, ...) a second mount(2) call, and everything else (an overlay's
lowerdir=/upperdir=/workdir=) the data string, the way containerd splits them.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import time
from collections.abc import Iterable, Sequence
from typing import Protocol

from kybernate.errors import FailedPrecondition, Internal, InvalidArgument

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24

MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# option -> (clear these flags?, flags)
_FLAG_OPTIONS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS),
    "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND),
    "defaults": (False, 0),
    "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC),
    "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC),
    "nomand": (True, MS_MANDLOCK),
    "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
}
_PROPAGATION_OPTIONS: dict[str, int] = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE,
    "runbindable": MS_UNBINDABLE | MS_REC,
}
# Options containerd implements itself (loop devices, id-mapped mounts); not here.
_UNSUPPORTED_OPTIONS = ("loop", "uidmap=", "gidmap=", "X-containerd.")


class MountError(Internal, OSError):
    """mount(2)/umount2(2) failed: an OSError with errno, and Internal on the wire."""

    def __init__(self, err: int, message: str) -> None:
        OSError.__init__(self, err, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class MountMessage(Protocol):
    """The fields of containerd.types.Mount that mounting reads."""

    type: str
    source: str
    target: str
    options: Sequence[str]


@dataclasses.dataclass(frozen=True)
class MountOptions:
    """Options split as mount(2) wants them."""

    flags: int
    propagation: int
    data: str


def parse_options(options: Iterable[str]) -> MountOptions:
    """Split containerd mount options into flags, propagation flags and the data string."""
    flags = 0
    propagation = 0
    data: list[str] = []
    for option in options:
        if option in _FLAG_OPTIONS:
            clear, bits = _FLAG_OPTIONS[option]
            flags = flags & ~bits if clear else flags | bits
        elif option in _PROPAGATION_OPTIONS:
            propagation |= _PROPAGATION_OPTIONS[option]
        elif option.startswith(_UNSUPPORTED_OPTIONS):
            raise InvalidArgument(f"mount option {option!r} is not supported")
        elif option:
            data.append(option)
    return MountOptions(flags=flags, propagation=propagation, data=",".join(data))


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return libc


def _mount_syscall(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if _libc().mount(source.encode() or None, target.encode(), fstype.encode() or None, flags,
                     data.encode() or None) != 0:
        err = ctypes.get_errno()
        raise MountError(err, f"mount {source or fstype!r} on {target} (type {fstype or '-'}, "
                              f"flags {flags:#x}, data {data!r}): {os.strerror(err)}")


def mount(m: MountMessage, target: str) -> str:
    """Mount one Mount at `target` (joined with m.target); returns where it went."""
    if not m.type and not m.source:
        raise InvalidArgument("mount needs a type or a source")
    where = _join_inside(target, m.target)
    options = parse_options(m.options)
    flags = options.flags
    if m.type == "bind":
        flags |= MS_BIND
    page = os.sysconf("SC_PAGE_SIZE")
    if len(options.data) >= page:
        raise InvalidArgument(f"{m.type} mount options are {len(options.data)} bytes; the kernel "
                              f"takes less than {page} (too many layers?)")
    _mount_syscall(m.source, where, m.type, flags & ~MS_RDONLY if flags & MS_BIND else flags,
                   options.data)
    try:
        if flags & MS_BIND and flags & (MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC):
            # A bind mount takes its flags only on a remount.
            _mount_syscall("", where, "", MS_REMOUNT | MS_BIND | (flags & ~MS_REC), "")
        if options.propagation:
            _mount_syscall("", where, "", options.propagation, "")
    except BaseException:
        unmount(where, detach=True)
        raise
    return where


def mount_rootfs(mounts: Sequence[MountMessage], target: str) -> None:
    """Mount every rootfs mount on `target`, in order; all or nothing.

    Raises MountError (an OSError, and Internal) naming the mount that failed.
    """
    if not os.path.isdir(target):
        raise FailedPrecondition(f"rootfs target {target} is not a directory")
    done: list[str] = []
    try:
        for m in mounts:
            done.append(mount(m, target))
    except BaseException:
        _unwind(done)
        raise


def _unwind(mounted: list[str]) -> None:
    for where in reversed(mounted):
        try:
            unmount(where)
        except OSError:
            unmount(where, detach=True)


def unmount(target: str, *, detach: bool = False) -> None:
    """umount2 once; EBUSY is retried for about 2.5 s before it is raised."""
    flags = UMOUNT_NOFOLLOW | (MNT_DETACH if detach else 0)
    for attempt in range(50):
        if _libc().umount2(target.encode(), flags) == 0:
            return
        err = ctypes.get_errno()
        if err != errno.EBUSY or attempt == 49:
            raise MountError(err, f"umount {target}: {os.strerror(err)}")
        time.sleep(0.05)


def unmount_all(target: str) -> None:
    """Unmount everything stacked on `target` until it is no mount point.

    A mount that stays busy is detached lazily (MNT_DETACH) so the bundle can go.
    """
    for _ in range(1024):  # a bound on stacked mounts, not a retry count
        try:
            unmount(target)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                return  # not (or no longer) a mount point
            if exc.errno != errno.EBUSY:
                raise
            try:
                unmount(target, detach=True)
            except OSError as detach_exc:
                if detach_exc.errno in (errno.EINVAL, errno.ENOENT):
                    return
                raise
    raise MountError(errno.ELOOP, f"{target}: more than 1024 stacked mounts")


def _join_inside(root: str, sub: str) -> str:
    if not sub:
        return root
    joined = os.path.normpath(os.path.join(root, sub.lstrip("/")))
    if joined != root and not joined.startswith(root.rstrip("/") + "/"):
        raise InvalidArgument(f"mount target {sub!r} escapes {root}")
    return joined
