"""What to ask CRIU for: dump and restore options, and the dump options of an OCI bundle.

`dump_options_from_bundle` builds what runc 1.1 passes to CRIU for `runc checkpoint`,
so images dumped here restore with stock `runc restore`:

- root is the container's rootfs (relative `root.path` is taken against the bundle);
- every bind mount, every device node (runc's default ones included) and, on cgroup v1
  without a cgroup namespace, every per-controller cgroup bind under the `cgroup` mount
  is an external mount whose key and value are its destination inside the container;
- masked paths that are files inside the running container map to /dev/null;
- a network (or PID) namespace given by path is external, `net[<inode>]:extRootNetNS`;
- cgroups are managed, orphan pts masters are requested, notify scripts are on;
- the network namespace is marked empty (`empty_ns` = CLONE_NEWNET): runc does not
  manage network devices, so it neither dumps nor restores their configuration;
- CRIU's config file is `/etc/criu/runc.conf` unless the `org.criu.config` annotation
  names another (an empty value means none).
"""

from __future__ import annotations

import os
import stat
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kybernate import mountinfo
from kybernate.errors import FailedPrecondition, InvalidArgument
from kybernate.oci import load_spec

CGROUP_MODES = ("ignore", "none", "props", "soft", "full", "strict", "default")

RUNC_CRIU_CONFIG = "/etc/criu/runc.conf"
CRIU_CONFIG_ANNOTATION = "org.criu.config"

# runc creates these nodes in every container (specconv.AllowedDevices with a path);
# a device of the same path in the spec replaces runc's.
RUNC_DEFAULT_DEVICES = (
    "/dev/null", "/dev/random", "/dev/full", "/dev/tty", "/dev/zero", "/dev/urandom",
)

# Namespaces CRIU can treat as external when the spec joins an existing one by path,
# with the key runc uses for each: OCI type -> (CRIU's name, key).
_EXTERNAL_NAMESPACES = {
    "network": ("net", "extRootNetNS"),
    "pid": ("pid", "extRootPidNS"),
}

_MAX_SYMLINKS = 255

CLONE_NEWNET = 0x40000000


@dataclass(kw_only=True)
class CriuOptions:
    """What a dump and a restore request share. Paths are on the host."""

    images_dir: Path
    work_dir: Path
    #: Absolute; for a restore, where the rootfs is mounted (None: the caller's root).
    root: Path | None = None
    tcp_established: bool = False
    ext_unix_sk: bool = False
    file_locks: bool = False
    shell_job: bool = False
    orphan_pts_master: bool = False
    manage_cgroups: bool = True
    manage_cgroups_mode: str = "soft"
    external: list[str] = field(default_factory=list)
    ext_mounts: list[tuple[str, str]] = field(default_factory=list)
    empty_ns: int = 0
    log_file: str
    log_level: int = 4
    timeout_s: int | None = None
    config_file: str | None = None

    def __post_init__(self) -> None:
        if self.root is not None and not self.root.is_absolute():
            raise InvalidArgument(f"CRIU root must be an absolute path, got {self.root}")
        if "/" in self.log_file:
            raise InvalidArgument(f"CRIU log file must be a bare name, got {self.log_file!r}")
        if self.manage_cgroups_mode not in CGROUP_MODES:
            raise InvalidArgument(f"unknown CRIU cgroup mode {self.manage_cgroups_mode!r}; "
                                  f"expected one of {', '.join(CGROUP_MODES)}")

    @property
    def log_path(self) -> Path:
        return self.work_dir / self.log_file


@dataclass(kw_only=True)
class DumpOptions(CriuOptions):
    """A CRIU dump request; `root` is the container's rootfs."""

    pid: int
    root: Path
    leave_running: bool = False
    orphan_pts_master: bool = True
    freeze_cgroup: str | None = None
    log_file: str = "dump.log"
    auto_dedup: bool = False
    track_mem: bool = False
    parent_img: str | None = None

    def __post_init__(self) -> None:
        if self.pid <= 0:
            raise InvalidArgument(f"CRIU dump needs a positive pid, got {self.pid}")
        super().__post_init__()


@dataclass(kw_only=True)
class RestoreOptions(CriuOptions):
    """A CRIU restore request.

    `inherit_fds` are (fd in the caller, key) pairs: the fd replaces the dumped file
    named by key, e.g. (5, "pipe:[1234]").
    """

    rst_sibling: bool = True
    inherit_fds: list[tuple[int, str]] = field(default_factory=list)
    cgroup_root: str | None = None
    evasive_devices: bool = True
    log_file: str = "restore.log"

    def __post_init__(self) -> None:
        super().__post_init__()
        for fd, key in self.inherit_fds:
            if fd < 0 or not key:
                raise InvalidArgument(f"bad inherit fd ({fd}, {key!r})")


def dump_options_from_bundle(
    bundle: Path,
    *,
    pid: int,
    images_dir: Path,
    work_dir: Path,
    freeze_cgroup: str | None,
    leave_running: bool,
    tcp_established: bool,
    ext_unix_sk: bool,
    file_locks: bool,
    terminal: bool,
) -> DumpOptions:
    """The options runc 1.1 would give CRIU to checkpoint the container of `bundle`
    whose init is `pid` (see the module docstring for what that means)."""
    bundle = Path(os.path.abspath(bundle))
    spec = load_spec(bundle)
    rootfs = rootfs_path(bundle, spec)
    linux = spec.get("linux") or {}
    namespaces = linux.get("namespaces") or []

    ext_mounts = [(dest, dest) for dest in external_mount_destinations(spec, rootfs)]
    ext_mounts += [(path, "/dev/null") for path in masked_files(pid, linux.get("maskedPaths") or [])]
    ext_mounts += [(dest, dest) for dest in (_in_rootfs(rootfs, d) for d in device_paths(linux))]

    return DumpOptions(
        images_dir=images_dir,
        work_dir=work_dir,
        pid=pid,
        root=rootfs,
        leave_running=leave_running,
        tcp_established=tcp_established,
        ext_unix_sk=ext_unix_sk,
        file_locks=file_locks,
        shell_job=terminal,
        # runc asks for it on every dump; it only matters for a terminal's pty.
        orphan_pts_master=True,
        manage_cgroups=True,
        freeze_cgroup=freeze_cgroup,
        external=external_namespaces(namespaces),
        ext_mounts=ext_mounts,
        empty_ns=CLONE_NEWNET,
        config_file=criu_config_file(spec),
    )


def rootfs_path(bundle: Path, spec: dict[str, Any]) -> Path:
    """The absolute rootfs of the spec; a relative root.path is relative to the bundle."""
    root = (spec.get("root") or {}).get("path")
    if not root:
        raise InvalidArgument(f"OCI spec in {bundle} has no root.path")
    return Path(os.path.abspath(bundle / root))


def _is_bind(mount: dict[str, Any]) -> bool:
    options = mount.get("options") or []
    return mount.get("type") == "bind" or "bind" in options or "rbind" in options


def external_mount_destinations(spec: dict[str, Any], rootfs: Path) -> list[str]:
    """Destinations CRIU must treat as external mounts, in spec order."""
    linux = spec.get("linux") or {}
    has_cgroupns = any(ns.get("type") == "cgroup" for ns in linux.get("namespaces") or [])
    cgroup_v1 = not _host_is_cgroup2_unified()
    destinations: list[str] = []
    for mount in spec.get("mounts") or []:
        dest = mount.get("destination")
        if not dest:
            raise InvalidArgument(f"OCI mount without a destination: {mount}")
        if _is_bind(mount):
            destinations.append(_in_rootfs(rootfs, dest))
        elif mount.get("type") == "cgroup" and cgroup_v1 and not has_cgroupns:
            # runc turns a v1 cgroup mount into one bind per host hierarchy.
            for hierarchy in host_cgroup_v1_hierarchies():
                destinations.append(_in_rootfs(rootfs, f"{dest.rstrip('/')}/{hierarchy}"))
    return destinations


def masked_files(pid: int, masked_paths: list[str]) -> list[str]:
    """Masked paths that are non-directories inside the container of `pid`: runc masks
    those by bind-mounting /dev/null over them."""
    files: list[str] = []
    for path in masked_paths:
        try:
            st = os.stat(f"/proc/{pid}/root/{path.lstrip('/')}")
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise FailedPrecondition(f"cannot inspect masked path {path} of pid {pid}: {exc}") from exc
        if not stat.S_ISDIR(st.st_mode):
            files.append(path)
    return files


def device_paths(linux: dict[str, Any]) -> list[str]:
    """Every device node runc creates: its defaults not overridden by the spec, then the
    spec's own devices."""
    spec_devices = [d.get("path") for d in linux.get("devices") or []]
    if any(not path for path in spec_devices):
        raise InvalidArgument("OCI device without a path")
    defaults = [path for path in RUNC_DEFAULT_DEVICES if path not in spec_devices]
    return defaults + [str(path) for path in spec_devices]


def external_namespaces(namespaces: list[dict[str, Any]]) -> list[str]:
    """`<ns>[<inode>]:<key>` for every namespace the spec joins by path that CRIU can
    leave external (network, pid)."""
    external: list[str] = []
    for ns in namespaces:
        kind = _EXTERNAL_NAMESPACES.get(ns.get("type", ""))
        path = ns.get("path")
        if kind is None or not path:
            continue
        try:
            inode = os.stat(path).st_ino
        except OSError as exc:
            raise FailedPrecondition(f"{ns['type']} namespace {path} of the spec: {exc}") from exc
        criu_name, key = kind
        external.append(f"{criu_name}[{inode}]:{key}")
    return external


def criu_config_file(spec: dict[str, Any]) -> str | None:
    """runc's rule: the org.criu.config annotation wins (empty: no file), else runc.conf."""
    annotations = spec.get("annotations") or {}
    if CRIU_CONFIG_ANNOTATION in annotations:
        return annotations[CRIU_CONFIG_ANNOTATION] or None
    return RUNC_CRIU_CONFIG


def host_cgroup_v1_hierarchies(
    mountinfo_text: str | None = None, own_cgroups: str | None = None
) -> list[str]:
    """Base names of the host's v1 cgroup mount points ("cpu,cpuacct", "freezer",
    "systemd", ...), one per hierarchy this process belongs to, in mount order.

    The arguments default to /proc/self/mountinfo and /proc/self/cgroup.
    """
    if mountinfo_text is None:
        mountinfo_text = Path(mountinfo.MOUNTINFO).read_text()
    if own_cgroups is None:
        own_cgroups = Path("/proc/self/cgroup").read_text()
    wanted: set[str] = set()
    for line in own_cgroups.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[1]:
            wanted.update(parts[1].split(","))
    seen: set[str] = set()
    names: list[str] = []
    for mount in mountinfo.parse(mountinfo_text):
        if mount.fstype != "cgroup":
            continue
        fresh = (set(mount.super_options) & wanted) - seen
        if not fresh:
            continue
        seen |= fresh
        names.append(os.path.basename(mount.mount_point))
    return names


def _host_is_cgroup2_unified() -> bool:
    return os.path.exists("/sys/fs/cgroup/cgroup.controllers")


def _in_rootfs(rootfs: Path, destination: str) -> str:
    """`destination` as the container sees it, symlinks resolved inside `rootfs` the way
    runc's securejoin does (never escaping it); parts that do not exist stay as given."""
    rootfs_str = str(rootfs)
    if destination.startswith(rootfs_str + "/"):
        destination = destination[len(rootfs_str):]
    pending = deque(part for part in destination.split("/") if part)
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.popleft()
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        try:
            target = os.readlink(rootfs.joinpath(*resolved, part))
        except OSError:
            resolved.append(part)
            continue
        links += 1
        if links > _MAX_SYMLINKS:
            raise InvalidArgument(f"too many symlinks resolving {destination} in {rootfs}")
        if target.startswith("/"):
            resolved = []
        pending.extendleft(reversed([p for p in target.split("/") if p]))
    return "/" + "/".join(resolved)
