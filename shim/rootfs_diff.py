"""Apply a checkpoint's writable layer (`rootfs-diff.tar`) to a new container's root.

The archive travels with the checkpoint, which may come from another node, a bucket
or an image: it is hostile input. It is applied by a child process that has
chroot()ed into the container's root, so every path in the archive, and every
symlink in it or in the image's lower layers, resolves inside that root: nothing can
be written outside it (a symlink to /etc in the image leads to the container's own
/etc). An upper-layer entry replaces the lower one as overlayfs would: a file never
writes through a symlink it replaces. Overlay whiteouts delete, opaque directories
hide what was below. Device nodes and anything else exotic are refused.

Python 3.11.2 (Debian 12) has no tarfile extraction filters; the chroot is the
boundary instead, and the member checks below say what is refused and why.

`apply_saved_layer` is the restore's entry: it skips a layer containerd applied already.
The child runs this module (`python -I -m kybernate.shim.rootfs_diff`), so it imports
little.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path, PurePosixPath

from kybernate import mountinfo
from kybernate.api.layout import ROOTFS_DIFF_FILE
from kybernate.errors import FailedPrecondition

log = logging.getLogger(__name__)

_OPAQUE_XATTR = "SCHILY.xattr.trusted.overlay.opaque"
APPLY_TIMEOUT_S = 600.0


def apply(diff: Path, rootfs: Path) -> None:
    """Apply `diff` to `rootfs` (blocking): FailedPrecondition naming the member and the
    reason when the archive is refused or cannot be applied."""
    result = subprocess.run(
        [sys.executable, "-I", "-m", "kybernate.shim.rootfs_diff", str(diff), str(rootfs)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        timeout=APPLY_TIMEOUT_S, check=False)
    if result.returncode != 0:
        reason = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {result.returncode}"]
        raise FailedPrecondition(f"restore: the writable layer {diff} was not applied: {reason[0]}")


def apply_saved_layer(image_dir: Path, rootfs: Path) -> None:
    """Unpack the checkpoint's writable layer into the rootfs, unless containerd
    already applied one (`ctr container restore --rw`: the upperdir is not empty)."""
    diff = image_dir / ROOTFS_DIFF_FILE
    if not diff.is_file():
        return
    upper = mountinfo.overlay_upperdir(mountinfo.read(), os.path.realpath(rootfs))
    if upper is not None and any(Path(upper).iterdir()):
        log.info("restore: %s has a writable layer already; not applying %s", rootfs, diff)
        return
    apply(diff, rootfs)
    log.info("restore: applied %s to %s", diff, rootfs)


def _inside(name: str) -> str:
    """The member's path from the container's root ("" for the root itself)."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"member {name!r} would lead outside the container's root")
    return "/".join(part for part in path.parts if part != ".")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _apply_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
    relative = _inside(member.name)
    target = "/" + relative
    if member.ischr() and member.devmajor == 0 and member.devminor == 0:
        if relative:
            _remove(target)  # an overlay whiteout: deleted in the writable layer
        return
    if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
        raise ValueError(f"member {member.name!r} is a device node or other special file; refused")
    if member.islnk():
        _inside(member.linkname)
    if member.isdir():
        if os.path.islink(target) or (os.path.lexists(target) and not os.path.isdir(target)):
            _remove(target)
        if member.pax_headers.get(_OPAQUE_XATTR) == "y" and os.path.isdir(target) and relative:
            for entry in os.listdir(target):  # opaque: nothing of the lower layers shows
                _remove(os.path.join(target, entry))
        if os.path.isdir(target):
            return  # keep the lower directory's contents
    elif os.path.lexists(target) or os.path.islink(target):
        _remove(target)
    archive.extract(member, "/", set_attrs=True, numeric_owner=True)


def main(argv: list[str]) -> int:
    """In the child: open the archive, chroot into the root, apply every member."""
    if len(argv) != 2:
        print("usage: python -m kybernate.shim.rootfs_diff DIFF.tar ROOTFS", file=sys.stderr)
        return 2
    diff, rootfs = argv
    try:
        with tarfile.open(diff, "r:") as archive:  # opened before the chroot hides it
            os.chroot(rootfs)
            os.chdir("/")
            for member in archive:
                _apply_member(archive, member)
    except (OSError, ValueError, tarfile.TarError) as err:
        print(f"{err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
