"""Checkpoints Kybernate did not make: runc's images (kubelet's forensic checkpoint of a
runc pod, `ctr checkpoint` of a runc container) restored into a Kybernate container.

Such images carry no checksums: runc writes none, containerd's archive and
checkpointctl's files (config.dump, spec.dump, status.dump) record none. So their
integrity is established from where they come from and from what they hold, before
CRIU reads a byte of them:

- Only containerd hands one over (CreateTaskRequest.checkpoint). It unpacked the
  directory itself, readable and writable by root alone: from its content store, where
  every blob was checked against its digest when it was pulled or imported (`ctr
  container restore`, a CRI checkpoint image), or from the archive kubelet named (CRI's
  restore from a file, containerd 2.1 and 2.2), whose entries containerd's CRI already
  limits to regular files and directories. An annotation or a host directory never
  names one: those must be Kybernate checkpoints, verified against metadata.json.
- Every entry is hostile input: regular files only, at the top (no directory, symlink
  or device), under names CRIU or runc write, so nothing leads CRIU anywhere else.
- Complete as CRIU wrote it: the inventory and the process tree are present; every
  image but the raw page files begins with CRIU's magic numbers; every pagemap lists
  exactly as many present pages as its pages file holds (a truncated, padded or swapped
  page file is refused); where CRIU's dump.log travelled beside the images (kubelet's
  archive), its last words are CRIU's success line.

What passed is described by a manifest (size and sha256 of every file), returned in
place of the metadata a Kybernate checkpoint carries.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

from kybernate.agent import commit
from kybernate.api.layout import METADATA_FILE
from kybernate.errors import DataLoss, FailedPrecondition

#: CRIU's magic numbers (criu/include/magic.h; go-criu's magic package).
IMG_COMMON_MAGIC = 0x54564319
IMG_SERVICE_MAGIC = 0x55105940
INVENTORY_MAGIC = 0x58313116
PSTREE_MAGIC = 0x50273030
PAGEMAP_MAGIC = 0x56084025
#: pagemap_entry flags (criu/include/pagemap.h): pages in this image, not the parent's.
PE_PARENT = 1 << 0
PE_PRESENT = 1 << 2
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
DUMP_SUCCESS = "Dumping finished successfully"

_IMAGE_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*\.img$")
_TAR_IMAGE_NAME = re.compile(r"^tmpfs-dev-[0-9]+\.tar\.gz\.img$")
_PAGES_NAME = re.compile(r"^pages-([0-9]+)\.img$")
_PAGEMAP_NAME = re.compile(r"^pagemap-[0-9]+\.img$")
#: What else runc (descriptors.json) and Kybernate (if a copy lost its metadata) put there.
_OTHER_FILES = frozenset({"descriptors.json", "rootfs-diff.tar"})
_MAX_ENTRY = 1 << 26  # no protobuf entry of a pagemap is anywhere near 64 MiB


def verify_foreign(directory: Path) -> dict[str, Any]:
    """Check a metadata-less image directory as described above; its manifest."""
    where = f"checkpoint {directory} (not a Kybernate checkpoint)"
    names = _regular_files(directory, where)
    for required in ("inventory.img", "pstree.img"):
        if required not in names:
            raise DataLoss(f"{where}: {required} is missing: not a complete CRIU dump")
    pages: dict[str, int] = {}
    for name in sorted(names):
        path = directory / name
        if _PAGES_NAME.match(name) or _TAR_IMAGE_NAME.match(name) or name in _OTHER_FILES:
            continue
        head = _read_head(path, 8)
        if name == "inventory.img":
            if int.from_bytes(head[:4], "little") != INVENTORY_MAGIC:
                raise DataLoss(f"{where}: inventory.img does not carry CRIU's inventory magic")
            continue
        first = int.from_bytes(head[:4], "little")
        if len(head) < 8 or first not in (IMG_COMMON_MAGIC, IMG_SERVICE_MAGIC):
            raise DataLoss(f"{where}: {name} does not carry CRIU's image magic")
        second = int.from_bytes(head[4:8], "little")
        if name == "pstree.img" and second != PSTREE_MAGIC:
            raise DataLoss(f"{where}: pstree.img is not a process tree image")
        if _PAGEMAP_NAME.match(name):
            if second != PAGEMAP_MAGIC:
                raise DataLoss(f"{where}: {name} is not a pagemap image")
            pages_id, count = _present_pages(path, where)
            pages[f"pages-{pages_id}.img"] = pages.get(f"pages-{pages_id}.img", 0) + count
    for name in names:
        if _PAGES_NAME.match(name) and name not in pages:
            raise DataLoss(f"{where}: {name} belongs to no pagemap")
    for name, count in pages.items():
        size = (directory / name).stat().st_size if name in names else -1
        if size != count * PAGE_SIZE:
            raise DataLoss(f"{where}: {name} holds {max(size, 0)} bytes, its pagemap lists {count} pages"
                           f" ({count * PAGE_SIZE} bytes)")
    _check_dump_log(directory, where)
    return {"format": "foreign", "files": commit.manifest(directory), "options": {}, "cuda": {}}


def _regular_files(directory: Path, where: str) -> set[str]:
    try:
        entries = list(os.scandir(directory))
    except OSError as err:
        raise DataLoss(f"{where}: cannot list it: {err.strerror}") from None
    names = set()
    for entry in entries:
        info = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(info.st_mode):
            raise DataLoss(f"{where}: {entry.name[:80]!r} is not a regular file; refused")
        if not (_IMAGE_NAME.match(entry.name) or _TAR_IMAGE_NAME.match(entry.name)
                or entry.name in _OTHER_FILES or entry.name == METADATA_FILE):
            raise DataLoss(f"{where}: {entry.name[:80]!r} is not a file CRIU or runc writes; refused")
        names.add(entry.name)
    return names


def _read_head(path: Path, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return f.read(size)


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if offset >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7


def _fields(message: bytes) -> dict[int, int]:
    """The varint fields of a protobuf message (others skipped): enough for pagemap."""
    found: dict[int, int] = {}
    offset = 0
    while offset < len(message):
        key, offset = _varint(message, offset)
        number, wire = key >> 3, key & 7
        if wire == 0:
            found[number], offset = _varint(message, offset)
        elif wire == 1:
            offset += 8
        elif wire == 2:
            length, offset = _varint(message, offset)
            offset += length
        elif wire == 5:
            offset += 4
        else:
            raise ValueError(f"wire type {wire}")
        if offset > len(message):
            raise ValueError("field past the end")
    return found


def _present_pages(path: Path, where: str) -> tuple[int, int]:
    """(pages_id, pages present in it) of a pagemap image: pagemap_head {pages_id = 1},
    then pagemap_entry {vaddr = 1, nr_pages = 2, in_parent = 3, flags = 4, pages = 5}
    each (CRIU 4 counts in the 64-bit `pages` and leaves `nr_pages` 0)."""
    data = path.read_bytes()
    offset, entries = 8, []
    try:
        while offset < len(data):
            if offset + 4 > len(data):
                raise ValueError("truncated entry size")
            size = int.from_bytes(data[offset:offset + 4], "little")
            offset += 4
            if size > _MAX_ENTRY or offset + size > len(data):
                raise ValueError("entry past the end")
            entries.append(_fields(data[offset:offset + size]))
            offset += size
    except ValueError as err:
        raise DataLoss(f"{where}: {path.name} is not a readable pagemap: {err}") from None
    if not entries:
        raise DataLoss(f"{where}: {path.name} has no pagemap header")
    pages_id, present = entries[0].get(1, 0), 0
    for entry in entries[1:]:
        flags = entry.get(4, 0)
        in_parent = bool(entry.get(3, 0)) or bool(flags & PE_PARENT)
        if flags & PE_PRESENT or (not flags and not in_parent):
            present += entry.get(5) or entry.get(2, 0)
    return pages_id, present


def _check_dump_log(directory: Path, where: str) -> None:
    """kubelet's archive keeps CRIU's dump.log beside the images directory."""
    log = directory.parent / "dump.log"
    try:
        info = os.lstat(log)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(info.st_mode):
        raise DataLoss(f"{where}: the dump.log beside it is not a regular file; refused")
    fd = os.open(log, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        f.seek(max(info.st_size - 4096, 0))
        tail = f.read().decode(errors="replace")
    if DUMP_SUCCESS not in tail:
        raise FailedPrecondition(f"{where}: CRIU's dump.log beside it does not end with {DUMP_SUCCESS!r}:"
                                 " the dump did not finish")
