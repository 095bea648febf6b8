"""/proc/PID/mountinfo, read one way by every part of Kybernate.

Each line is `ID PARENT MAJ:MIN ROOT MOUNT_POINT MOUNT_OPTIONS [OPTIONAL...] - FSTYPE
SOURCE SUPER_OPTIONS` (proc(5)). The kernel writes space, tab, newline and backslash in
paths as three-digit octal escapes (`\\040`), and overlayfs escapes ',' and '=' in its
`upperdir=`/`lowerdir=` values the same way, so super options are split on ',' first
and unescaped after.

The shim's `start` command reads this on every container start: nothing here may pull
in dataclasses, typing or re (each costs it milliseconds).
"""

from __future__ import annotations

MOUNTINFO = "/proc/self/mountinfo"
#: Fields before the optional ones: ID PARENT MAJ:MIN ROOT MOUNT_POINT MOUNT_OPTIONS.
_FIXED_FIELDS = 6


class Mount:
    """One line of mountinfo, its paths and options unescaped."""

    __slots__ = ("fstype", "mount_point", "root", "source", "super_options")

    def __init__(self, *, root: str, mount_point: str, fstype: str, source: str,
                 super_options: tuple[str, ...]) -> None:
        self.root = root
        self.mount_point = mount_point
        self.fstype = fstype
        self.source = source
        self.super_options = super_options

    def super_option(self, name: str) -> str | None:
        """The value of the super option `name=value`, None when it is not set."""
        prefix = name + "="
        for option in self.super_options:
            if option.startswith(prefix):
                return option[len(prefix):]
        return None

    def __repr__(self) -> str:
        return (f"Mount(root={self.root!r}, mount_point={self.mount_point!r}, fstype={self.fstype!r}, "
                f"source={self.source!r}, super_options={self.super_options!r})")


def unescape(field: str) -> str:
    """A mountinfo field with its `\\ooo` octal escapes decoded."""
    if "\\" not in field:
        return field
    out: list[str] = []
    i = 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and all("0" <= c <= "7" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_line(line: str) -> Mount | None:
    """One line as a Mount; None for a line that is not one."""
    fields = line.split()
    try:
        separator = fields.index("-", _FIXED_FIELDS)
    except ValueError:
        return None
    if len(fields) < separator + 3:
        return None
    super_options = fields[separator + 3] if len(fields) > separator + 3 else ""
    return Mount(root=unescape(fields[3]), mount_point=unescape(fields[4]),
                 fstype=unescape(fields[separator + 1]), source=unescape(fields[separator + 2]),
                 super_options=tuple(unescape(o) for o in super_options.split(",") if o))


def parse(text: str) -> list[Mount]:
    """Every mount of a mountinfo text, in its order (a later mount covers an earlier
    one at the same mount point)."""
    return [mount for mount in map(parse_line, text.splitlines()) if mount is not None]


def read(path: str = MOUNTINFO) -> list[Mount]:
    """The mounts of a mountinfo file (this process's by default)."""
    with open(path) as f:
        return parse(f.read())


def of_process(pid: int) -> list[Mount]:
    """The mounts process `pid` sees (in its own mount namespace)."""
    return read(f"/proc/{pid}/mountinfo")


def visible_at(mounts: list[Mount], mount_point: str) -> Mount | None:
    """The mount that shows at `mount_point`: the last one mounted there."""
    for mount in reversed(mounts):
        if mount.mount_point == mount_point:
            return mount
    return None


def overlay_upperdir(mounts: list[Mount], mount_point: str) -> str | None:
    """The upperdir of the overlay showing at `mount_point`; None when what shows there
    is not an overlay (or nothing is mounted there)."""
    mount = visible_at(mounts, mount_point)
    if mount is None or mount.fstype != "overlay":
        return None
    return mount.super_option("upperdir")
