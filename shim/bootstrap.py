"""Which task API to speak, and what `start` prints to say so.

containerd reads `start`'s output as JSON bootstrap parameters
(`{"version": N, "address": ..., "protocol": "ttrpc"}`) or, when that fails to parse,
as a bare address meaning task API v2. containerd 1.7 refuses any version above 2
("unsupported shim version (3)"); containerd 2.x accepts up to 3 and then calls
`containerd.task.v3.Task` (it still bridges v2 for older shims). So the version must
match the containerd that runs us.

containerd does not say which it is: 1.7 and 2.1 alike export `MAX_SHIM_VERSION=2`,
and 2.1 writes the same options Any on stdin as 1.7 (the bootstrap parameters on
stdin, start_params.py, come with 2.3). What does tell them apart is containerd's own
binary: `start` runs as its child, and a Go binary names its main package in the
build information of its `.go.buildinfo` section, under the module path
`github.com/containerd/containerd/v2/...` from 2.0 on. A binary we cannot read or do
not recognise (a wrapper, an embedding distribution) gets v2, which every containerd
since 1.5 accepts.

Kept import-light: `start` runs once per container.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import BinaryIO

#: Task API versions, as containerd numbers them in the bootstrap parameters.
TASK_API_V2 = 2
TASK_API_V3 = 3
#: What every containerd with shim v2 support understands.
FALLBACK_TASK_API = TASK_API_V2

_CONTAINERD_PACKAGE = "github.com/containerd/containerd"
_BUILDINFO_SECTION = b".go.buildinfo"
_BUILDINFO_MAGIC = b"\xff Go buildinf:"
_BUILDINFO_INLINE_STRINGS = 0x2  # flag set by Go 1.18 and newer
_BUILDINFO_HEADER_SIZE = 32
# The module information is framed by 16-byte sentinels.
_MODINFO_SENTINEL_SIZE = 16
# Build information is a few hundred bytes; anything larger is not what we look for.
_MAX_BUILDINFO = 1 << 20
_ELF_MAGIC = b"\x7fELF"
_ELF_CLASS_64 = 2
_ELF_LITTLE_ENDIAN = 1


class BuildInfoUnreadable(Exception):
    """The binary is not a 64-bit little-endian ELF Go binary with build information."""


def go_main_package(executable: str) -> str:
    """The main package path recorded in a Go binary's build information."""
    with open(executable, "rb") as f:
        section = _elf_section(f, _BUILDINFO_SECTION)
        if section is None:
            raise BuildInfoUnreadable(f"{executable}: no {_BUILDINFO_SECTION.decode()} section")
        offset, size = section
        f.seek(offset)
        data = f.read(min(size, _MAX_BUILDINFO))
    return _main_package(data)


def containerd_major(executable: str) -> int | None:
    """containerd's major version from its binary, None when it is not recognisable."""
    try:
        package = go_main_package(executable)
    except (OSError, BuildInfoUnreadable):
        return None
    if package == _CONTAINERD_PACKAGE or not package.startswith(_CONTAINERD_PACKAGE + "/"):
        return None
    first = package[len(_CONTAINERD_PACKAGE) + 1:].split("/", 1)[0]
    if first.startswith("v") and first[1:].isdigit():
        return int(first[1:])  # Go's semantic import path: /v2 from 2.0 on
    return 1


def preferred_task_api(containerd_pid: int) -> int:
    """The task API version the containerd with this pid prefers."""
    major = containerd_major(f"/proc/{containerd_pid}/exe")
    if major is None:
        return FALLBACK_TASK_API
    return TASK_API_V3 if major >= 2 else TASK_API_V2


def start_output(address: str, task_api: int) -> str:
    """What `start` prints: the bare address for v2 (as runc's 1.7 shim does), the
    bootstrap parameters for newer versions."""
    if task_api <= TASK_API_V2:
        return address
    return json.dumps({"version": task_api, "address": address, "protocol": "ttrpc"},
                      separators=(",", ":"))


def _elf_section(f: BinaryIO, wanted: bytes) -> tuple[int, int] | None:
    """(file offset, size) of the named section of a 64-bit little-endian ELF file."""
    header = f.read(64)
    if len(header) < 64 or header[:4] != _ELF_MAGIC:
        raise BuildInfoUnreadable("not an ELF file")
    if header[4] != _ELF_CLASS_64 or header[5] != _ELF_LITTLE_ENDIAN:
        raise BuildInfoUnreadable("not a 64-bit little-endian ELF file")

    def u(data: bytes, at: int, size: int) -> int:
        return int.from_bytes(data[at:at + size], "little")

    table_offset, entry_size = u(header, 0x28, 8), u(header, 0x3A, 2)
    count, names_index = u(header, 0x3C, 2), u(header, 0x3E, 2)
    if entry_size < 0x28 or not 0 < count <= 4096 or names_index >= count:
        raise BuildInfoUnreadable("malformed ELF section table")
    f.seek(table_offset)
    table = f.read(entry_size * count)
    if len(table) < entry_size * count:
        raise BuildInfoUnreadable("truncated ELF section table")
    entries = [table[i * entry_size:(i + 1) * entry_size] for i in range(count)]
    names = entries[names_index]
    f.seek(u(names, 0x18, 8))
    strings = f.read(min(u(names, 0x20, 8), _MAX_BUILDINFO))
    for entry in entries:
        name_at = u(entry, 0, 4)
        if strings[name_at:name_at + len(wanted) + 1] == wanted + b"\0":
            return u(entry, 0x18, 8), u(entry, 0x20, 8)
    return None


def _main_package(data: bytes) -> str:
    """The `path` line of the module information in a `.go.buildinfo` section."""
    if not data.startswith(_BUILDINFO_MAGIC) or len(data) < _BUILDINFO_HEADER_SIZE:
        raise BuildInfoUnreadable("no Go build information")
    if not data[len(_BUILDINFO_MAGIC) + 1] & _BUILDINFO_INLINE_STRINGS:
        raise BuildInfoUnreadable("build information of a Go release before 1.18")
    at = _BUILDINFO_HEADER_SIZE
    _, at = _read_string(data, at)  # the Go version
    module_info, _ = _read_string(data, at)
    if len(module_info) < 2 * _MODINFO_SENTINEL_SIZE:
        raise BuildInfoUnreadable("build information without module information")
    text = module_info[_MODINFO_SENTINEL_SIZE:-_MODINFO_SENTINEL_SIZE].decode(errors="replace")
    for line in text.splitlines():
        key, _, value = line.partition("\t")
        if key == "path":
            return value
    raise BuildInfoUnreadable("build information names no main package")


def _read_string(data: bytes, at: int) -> tuple[bytes, int]:
    """A uvarint-length-prefixed string at `at`, and the offset after it."""
    length = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise BuildInfoUnreadable("truncated build information")
        byte = data[at]
        at += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            break
    if at + length > len(data):
        raise BuildInfoUnreadable("truncated build information")
    return data[at:at + length], at + length


__all__ = [
    "FALLBACK_TASK_API",
    "TASK_API_V2",
    "TASK_API_V3",
    "BuildInfoUnreadable",
    "containerd_major",
    "go_main_package",
    "preferred_task_api",
    "start_output",
]

