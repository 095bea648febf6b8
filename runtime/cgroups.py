"""A container's cgroup, v1 (per-controller hierarchies) or v2 (unified).

What the shim and the agent need: freeze and thaw that wait until the kernel says the
state is reached, the pids, the freezer path CRIU's `freeze_cgroup` wants, containerd's
Metrics for `Stats`, and OOM-kill notifications. Mount points come from
/proc/self/mountinfo, never from a hard-coded /sys/fs/cgroup layout.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import errno
import os
import signal
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from google.protobuf.message import Message
from kybernate import mountinfo
from kybernate.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound

DEFAULT_STATE_TIMEOUT = 10.0
#: How long killing a cgroup's processes may take before it is reported stuck.
KILL_TIMEOUT = 10.0
#: How long the freeze before a v1 kill may take: a task in uninterruptible sleep can
#: hold the cgroup FREEZING, and then the kill goes ahead anyway.
KILL_FREEZE_TIMEOUT = 1.0
#: memory.events has no eventfd; it is polled this often for new oom_kill counts.
V2_OOM_POLL_INTERVAL = 0.5
#: The controllers whose directory we look in for procs, in order of preference.
_PROCS_CONTROLLERS = ("freezer", "pids", "memory", "cpu", "devices", "blkio", "cpuacct", "name=systemd")


@dataclasses.dataclass(frozen=True)
class HierarchyMount:
    """Where one cgroup hierarchy is mounted, and which cgroup its mount shows as root."""

    mountpoint: str
    root: str

    def directory(self, cgroup_path: str) -> str:
        """The directory of `cgroup_path` (as /proc/PID/cgroup names it) in this mount."""
        relative = os.path.relpath(cgroup_path, self.root) if self.root != "/" else cgroup_path.lstrip("/")
        if relative.startswith(".."):
            raise NotFound(f"cgroup {cgroup_path} is outside the mount {self.mountpoint} (root {self.root})")
        return os.path.normpath(os.path.join(self.mountpoint, relative))


@dataclasses.dataclass(frozen=True)
class CgroupMounts:
    """Every cgroup hierarchy this process can see: v1 by controller, and v2."""

    v1: Mapping[str, HierarchyMount]
    v2: HierarchyMount | None

    @classmethod
    def read(cls, path: str = mountinfo.MOUNTINFO) -> CgroupMounts:
        """The cgroup hierarchies of a mountinfo file (this process's by default)."""
        v1: dict[str, HierarchyMount] = {}
        v2: HierarchyMount | None = None
        for mount in mountinfo.read(path):
            hierarchy = HierarchyMount(mountpoint=mount.mount_point, root=mount.root)
            if mount.fstype == "cgroup2":
                v2 = v2 or hierarchy
            elif mount.fstype == "cgroup":
                for option in mount.super_options:
                    if option in ("rw", "ro") or option.startswith(("release_agent=", "clone_children")):
                        continue
                    v1.setdefault(option, hierarchy)
        return cls(v1=v1, v2=v2)


def read_proc_cgroup(pid: int | str) -> tuple[dict[str, str], str | None]:
    """(v1 controller -> path, v2 path or None) from /proc/PID/cgroup."""
    v1: dict[str, str] = {}
    v2: str | None = None
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise NotFound(f"process {pid} does not exist") from None
    for line in lines:
        hierarchy_id, controllers, path = line.split(":", 2)
        if hierarchy_id == "0" and controllers == "":
            v2 = path
            continue
        for controller in controllers.split(","):
            if controller:
                v1[controller] = path
    return v1, v2


def systemd_cgroup_path(cgroups_path: str) -> str:
    """'slice:prefix:name' (runc's systemd form) as a cgroup path."""
    parts = cgroups_path.split(":")
    if len(parts) != 3:
        raise InvalidArgument(f"systemd cgroupsPath must be slice:prefix:name, got {cgroups_path!r}")
    slice_name, prefix, name = parts
    slice_name = slice_name or "system.slice"
    # "a-b-c.slice" lives in a.slice/a-b.slice/a-b-c.slice
    stem = slice_name.removesuffix(".slice")
    nested = [] if stem == "-" else ["-".join(stem.split("-")[: i + 1]) + ".slice"
                                     for i in range(len(stem.split("-")))]
    unit = name if name.endswith((".scope", ".slice")) else f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
    return "/" + "/".join([*nested, unit])


class Cgroup(abc.ABC):
    """The cgroup of one container; `CgroupV1` or `CgroupV2`."""

    version: int

    # -- finding it ----------------------------------------------------------------

    @classmethod
    def for_pid(cls, pid: int, *, version: int | None = None,
                mounts: CgroupMounts | None = None) -> Cgroup:
        """The cgroup(s) `pid` is in. On a hybrid host v1 wins (that is what runc uses)
        unless `version` says otherwise."""
        mounts = mounts or CgroupMounts.read()
        v1_paths, v2_path = read_proc_cgroup(pid)
        want_v1 = version == 1 or (version is None and bool(v1_paths) and bool(mounts.v1))
        if want_v1:
            return CgroupV1.at({c: p for c, p in v1_paths.items() if c in mounts.v1}, mounts)
        if v2_path is None or mounts.v2 is None:
            raise NotFound(f"process {pid} has no cgroup v2 membership visible here")
        return CgroupV2(mounts.v2.directory(v2_path))

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], pid: int | None = None, *,
                  mounts: CgroupMounts | None = None) -> Cgroup:
        """The cgroup an OCI spec asks for (`linux.cgroupsPath`), or `pid`'s when given
        (which is exact even when runc resolved a relative or systemd path)."""
        if pid is not None:
            return cls.for_pid(pid, mounts=mounts)
        mounts = mounts or CgroupMounts.read()
        raw = (spec.get("linux") or {}).get("cgroupsPath") or ""
        if not raw:
            raise InvalidArgument("spec has no linux.cgroupsPath and no pid was given")
        path = systemd_cgroup_path(raw) if ":" in raw else raw
        if mounts.v1:
            own, _ = read_proc_cgroup("self")
            return CgroupV1.at({c: path if path.startswith("/") else os.path.join(own.get(c, "/"), path)
                                for c in mounts.v1}, mounts)
        if mounts.v2 is None:
            raise NotFound("no cgroup hierarchy is mounted")
        _, own_v2 = read_proc_cgroup("self")
        if not path.startswith("/"):
            path = os.path.join(own_v2 or "/", path)
        return CgroupV2(mounts.v2.directory(path))

    # -- what every version offers -------------------------------------------------

    @abc.abstractmethod
    def freezer_path(self) -> str:
        """The directory CRIU's freeze_cgroup wants."""

    @abc.abstractmethod
    def is_frozen(self) -> bool:
        """Whether every task is frozen (FREEZING counts as not frozen)."""

    @abc.abstractmethod
    async def freeze(self, timeout: float = DEFAULT_STATE_TIMEOUT) -> None:
        """Freeze all tasks and wait until the kernel reports them frozen."""

    @abc.abstractmethod
    async def thaw(self, timeout: float = DEFAULT_STATE_TIMEOUT) -> None:
        """Thaw all tasks and wait until the kernel reports them thawed."""

    @abc.abstractmethod
    def procs_dir(self) -> str:
        """A directory whose cgroup.procs (recursively) lists the container's processes."""

    @abc.abstractmethod
    def stats(self) -> Message:
        """containerd's Metrics message for this cgroup version."""

    @abc.abstractmethod
    def oom_events(self) -> AsyncIterator[None]:
        """Yields once per OOM kill in the cgroup; ends when the cgroup is removed."""

    def pids(self) -> list[int]:
        """Every process in the cgroup and its descendants."""
        found: list[int] = []
        for directory, _dirs, _files in os.walk(self.procs_dir()):
            try:
                with open(os.path.join(directory, "cgroup.procs")) as f:
                    found.extend(int(line) for line in f if line.strip())
            except FileNotFoundError:
                continue  # removed while walking
        return found

    def exists(self) -> bool:
        """Whether the cgroup directory is still there."""
        return os.path.isdir(self.procs_dir())

    async def kill(self, timeout: float = KILL_TIMEOUT) -> list[int]:
        """SIGKILL every process in the cgroup, none forking past it, and wait until
        the cgroup holds none (zombies leave cgroup.procs at exit); the pids signalled.
        A cgroup that is already gone has nothing to kill."""
        if not self.exists():
            return []
        victims = await self._kill_all()
        await _until(lambda: not self._live_pids(), timeout,
                     f"processes of cgroup {self.procs_dir()} still alive after SIGKILL")
        return victims

    async def _kill_all(self) -> list[int]:
        """Freeze, list, SIGKILL, thaw: frozen tasks cannot fork, and die once thawed."""
        try:
            await self.freeze(KILL_FREEZE_TIMEOUT)
        except (DeadlineExceeded, NotFound, OSError):
            pass  # a task in uninterruptible sleep holds FREEZING: kill what is there
        victims = self._signal_all(signal.SIGKILL)
        try:
            await self.thaw(KILL_FREEZE_TIMEOUT)
        except (DeadlineExceeded, NotFound, OSError):
            pass
        return victims

    def _live_pids(self) -> list[int]:
        try:
            pids = self.pids()
        except OSError:
            return []
        if pids:  # stragglers (a task that was in the middle of fork): again
            self._signal_all(signal.SIGKILL, pids)
        return pids

    def _signal_all(self, signum: int, pids: list[int] | None = None) -> list[int]:
        victims = self.pids() if pids is None else pids
        for pid in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)
        return victims


class CgroupV1(Cgroup):
    """A cgroup in the v1 hierarchies: one directory per controller."""

    version = 1

    def __init__(self, paths: Mapping[str, str]) -> None:
        if not paths:
            raise InvalidArgument("a v1 cgroup needs at least one controller directory")
        self.paths = dict(paths)

    @classmethod
    def at(cls, cgroup_paths: Mapping[str, str], mounts: CgroupMounts) -> CgroupV1:
        """From controller -> cgroup path (as in /proc/PID/cgroup) and the mounts."""
        return cls({c: mounts.v1[c].directory(p) for c, p in cgroup_paths.items() if c in mounts.v1})

    def path(self, controller: str) -> str:
        """The directory of one controller; NotFound if it is not mounted."""
        try:
            return self.paths[controller]
        except KeyError:
            raise NotFound(f"cgroup v1 controller {controller!r} is not mounted") from None

    def freezer_path(self) -> str:
        return self.path("freezer")

    def procs_dir(self) -> str:
        for controller in _PROCS_CONTROLLERS:
            if controller in self.paths:
                return self.paths[controller]
        return next(iter(self.paths.values()))

    def freezer_state(self) -> str:
        """FROZEN, FREEZING or THAWED."""
        return _read(self.freezer_path(), "freezer.state").strip()

    def is_frozen(self) -> bool:
        return self.freezer_state() == "FROZEN"

    async def freeze(self, timeout: float = DEFAULT_STATE_TIMEOUT) -> None:
        # A task in an uninterruptible sleep can keep the cgroup in FREEZING; the
        # kernel retries only when asked, so ask again with backoff, as runc does.
        try:
            await _until(lambda: self._request_freezer("FROZEN") == "FROZEN", timeout,
                         f"cgroup {self.freezer_path()} did not freeze")
        except BaseException:
            with contextlib.suppress(OSError):
                _write(self.freezer_path(), "freezer.state", "THAWED")  # never leave it half frozen
            raise

    async def thaw(self, timeout: float = DEFAULT_STATE_TIMEOUT) -> None:
        await _until(lambda: self._request_freezer("THAWED") == "THAWED", timeout,
                     f"cgroup {self.freezer_path()} did not thaw")

    def _request_freezer(self, state: str) -> str:
        _write(self.freezer_path(), "freezer.state", state)
        return self.freezer_state()

    def stats(self) -> Message:
        from kybernate.protos import cgroups_v1_metrics_pb2 as v1

        metrics = v1.Metrics()
        if "pids" in self.paths:
            d = self.paths["pids"]
            metrics.pids.current = _read_int(d, "pids.current", missing_ok=True)
            metrics.pids.limit = _read_int(d, "pids.max", missing_ok=True)
        if "cpuacct" in self.paths:
            d = self.paths["cpuacct"]
            usage = metrics.cpu.usage
            usage.total = _read_int(d, "cpuacct.usage", missing_ok=True)
            ticks = _read_flat_keyed(d, "cpuacct.stat", missing_ok=True)
            hz = os.sysconf("SC_CLK_TCK")
            usage.user = ticks.get("user", 0) * 1_000_000_000 // hz
            usage.kernel = ticks.get("system", 0) * 1_000_000_000 // hz
            usage.per_cpu.extend(int(v) for v in _read_optional(d, "cpuacct.usage_percpu").split())
        if "cpu" in self.paths:
            cpu_stat = _read_flat_keyed(self.paths["cpu"], "cpu.stat", missing_ok=True)
            throttling = metrics.cpu.throttling
            throttling.periods = cpu_stat.get("nr_periods", 0)
            throttling.throttled_periods = cpu_stat.get("nr_throttled", 0)
            throttling.throttled_time = cpu_stat.get("throttled_time", 0)
        if "memory" in self.paths:
            self._memory_stats(metrics, self.paths["memory"])
        if "blkio" in self.paths:
            self._blkio_stats(metrics, self.paths["blkio"])
        return metrics

    @staticmethod
    def _memory_stats(metrics: Any, d: str) -> None:
        memory = metrics.memory
        stat = _read_flat_keyed(d, "memory.stat", missing_ok=True)
        # memory.stat's names, as containerd's Metrics spells them.
        renamed = {"pgpgin": "pg_pg_in", "pgpgout": "pg_pg_out", "pgfault": "pg_fault",
                   "pgmajfault": "pg_maj_fault", "hierarchical_memsw_limit": "hierarchical_swap_limit"}
        for key, value in stat.items():
            total = key.startswith("total_")
            base = key.removeprefix("total_")
            name = ("total_" if total else "") + renamed.get(base, base)
            if _is_scalar_field(memory, name):
                setattr(memory, name, value)
        for entry, prefix in ((memory.usage, "memory."), (memory.swap, "memory.memsw."),
                              (memory.kernel, "memory.kmem."), (memory.kernel_tcp, "memory.kmem.tcp.")):
            if not os.path.exists(os.path.join(d, f"{prefix}usage_in_bytes")):
                continue
            entry.usage = _read_int(d, f"{prefix}usage_in_bytes", missing_ok=True)
            entry.limit = _read_int(d, f"{prefix}limit_in_bytes", missing_ok=True)
            entry.max = _read_int(d, f"{prefix}max_usage_in_bytes", missing_ok=True)
            entry.failcnt = _read_int(d, f"{prefix}failcnt", missing_ok=True)
        oom = _read_flat_keyed(d, "memory.oom_control", missing_ok=True)
        metrics.memory_oom_control.oom_kill_disable = oom.get("oom_kill_disable", 0)
        metrics.memory_oom_control.under_oom = oom.get("under_oom", 0)
        metrics.memory_oom_control.oom_kill = oom.get("oom_kill", 0)

    @staticmethod
    def _blkio_stats(metrics: Any, d: str) -> None:
        # CFQ's files are gone on modern kernels; BFQ's or the throttle layer's remain.
        for field_name, base in (("io_service_bytes_recursive", "io_service_bytes_recursive"),
                                 ("io_serviced_recursive", "io_serviced_recursive")):
            for prefix in ("blkio.", "blkio.bfq.", "blkio.throttle."):
                entries = _parse_blkio(_read_optional(d, prefix + base))
                if entries:
                    getattr(metrics.blkio, field_name).extend(entries)
                    break

    def oom_events(self) -> AsyncIterator[None]:
        return self._oom_events()

    async def _oom_events(self) -> AsyncIterator[None]:
        directory = self.path("memory")
        loop = asyncio.get_running_loop()
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            control = os.open(os.path.join(directory, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
            try:
                _write(directory, "cgroup.event_control", f"{efd} {control}")
            finally:
                os.close(control)
            while True:
                ready: asyncio.Future[None] = loop.create_future()
                loop.add_reader(efd, _wake, ready)
                try:
                    await ready
                finally:
                    loop.remove_reader(efd)
                try:
                    os.eventfd_read(efd)
                except BlockingIOError:
                    continue
                # The kernel also signals the eventfd when the cgroup is removed.
                if not os.path.isdir(directory):
                    return
                yield None
        finally:
            os.close(efd)


class CgroupV2(Cgroup):
    """A cgroup in the unified hierarchy."""

    version = 2

    def __init__(self, path: str) -> None:
        self.path = path

    def freezer_path(self) -> str:
        return self.path

    def procs_dir(self) -> str:
        return self.path

    def is_frozen(self) -> bool:
        return _read_flat_keyed(self.path, "cgroup.events").get("frozen") == 1

    async def freeze(self, timeout: float = DEFAULT_STATE_TIMEOUT) -> None:
        _write(self.path, "cgroup.freeze", "1")
        try:
            await _until(self.is_frozen, timeout, f"cgroup {self.path} did not freeze")
        except BaseException:
            with contextlib.suppress(OSError):
                _write(self.path, "cgroup.freeze", "0")
            raise

    async def thaw(self, timeout: float = DEFAULT_STATE_TIMEOUT) -> None:
        _write(self.path, "cgroup.freeze", "0")
        await _until(lambda: not self.is_frozen(), timeout, f"cgroup {self.path} did not thaw")

    async def _kill_all(self) -> list[int]:
        # cgroup.kill (Linux 5.14) kills the whole subtree at once, forks included.
        if not os.path.exists(os.path.join(self.path, "cgroup.kill")):
            return await super()._kill_all()
        victims = self.pids()
        _write(self.path, "cgroup.kill", "1")
        return victims

    def stats(self) -> Message:
        from kybernate.protos import cgroups_v2_metrics_pb2 as v2

        metrics = v2.Metrics()
        d = self.path
        if os.path.exists(os.path.join(d, "pids.current")):
            metrics.pids.current = _read_int(d, "pids.current", missing_ok=True)
            metrics.pids.limit = _read_int(d, "pids.max", missing_ok=True)
        cpu = _read_flat_keyed(d, "cpu.stat", missing_ok=True)
        for key in ("usage_usec", "user_usec", "system_usec", "nr_periods", "nr_throttled",
                    "throttled_usec"):
            setattr(metrics.cpu, key, cpu.get(key, 0))
        if os.path.exists(os.path.join(d, "memory.current")):
            memory = metrics.memory
            for key, value in _read_flat_keyed(d, "memory.stat", missing_ok=True).items():
                if _is_scalar_field(memory, key):
                    setattr(memory, key, value)
            memory.usage = _read_int(d, "memory.current", missing_ok=True)
            memory.usage_limit = _read_int(d, "memory.max", missing_ok=True)
            memory.swap_usage = _read_int(d, "memory.swap.current", missing_ok=True)
            memory.swap_limit = _read_int(d, "memory.swap.max", missing_ok=True)
            events = _read_flat_keyed(d, "memory.events", missing_ok=True)
            for key in ("low", "high", "max", "oom", "oom_kill"):
                setattr(metrics.memory_events, key, events.get(key, 0))
        for line in _read_optional(d, "io.stat").splitlines():
            device, *pairs = line.split()
            major, minor = (int(n) for n in device.split(":"))
            values = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
            metrics.io.usage.add(major=major, minor=minor,
                                 **{k: int(values.get(k, 0)) for k in ("rbytes", "wbytes", "rios", "wios")})
        return metrics

    def oom_kills(self) -> int:
        """memory.events' oom_kill counter (0 without the memory controller)."""
        return _read_flat_keyed(self.path, "memory.events", missing_ok=True).get("oom_kill", 0)

    def oom_events(self) -> AsyncIterator[None]:
        return self._oom_events()

    async def _oom_events(self) -> AsyncIterator[None]:
        # memory.events offers no eventfd; polling the counter is simple and cheap.
        seen = self.oom_kills()
        while os.path.isdir(self.path):
            await asyncio.sleep(V2_OOM_POLL_INTERVAL)
            try:
                now = self.oom_kills()
            except NotFound:
                return
            for _ in range(max(0, now - seen)):
                yield None
            seen = max(seen, now)


# -- small file helpers ------------------------------------------------------------


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _until(done: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `done` with exponential backoff (1 ms to 100 ms) until true or timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.001
    while not done():
        if loop.time() >= deadline:
            raise DeadlineExceeded(f"{what} within {timeout}s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


def _read(directory: str, name: str) -> str:
    try:
        with open(os.path.join(directory, name)) as f:
            return f.read()
    except FileNotFoundError:
        raise NotFound(f"{os.path.join(directory, name)} does not exist") from None


def _read_optional(directory: str, name: str) -> str:
    try:
        return _read(directory, name)
    except NotFound:
        return ""


def _read_int(directory: str, name: str, *, missing_ok: bool = False) -> int:
    """An integer file; 'max' (no limit) reads as 0, as containerd reports it."""
    text = (_read_optional(directory, name) if missing_ok else _read(directory, name)).strip()
    if not text or text == "max":
        return 0
    return int(text)


def _read_flat_keyed(directory: str, name: str, *, missing_ok: bool = False) -> dict[str, int]:
    """A 'key value' per line file."""
    text = _read_optional(directory, name) if missing_ok else _read(directory, name)
    values: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            with contextlib.suppress(ValueError):
                values[parts[0]] = int(parts[1])
    return values


def _write(directory: str, name: str, value: str) -> None:
    path = os.path.join(directory, name)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist") from None
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise FailedPrecondition(f"{path}: busy") from exc
        raise
    finally:
        os.close(fd)


def _is_scalar_field(message: Any, name: str) -> bool:
    # memory.stat has keys such as "swap" that name sub-messages in the proto.
    field = message.DESCRIPTOR.fields_by_name.get(name)
    return field is not None and field.message_type is None


def _parse_blkio(text: str) -> list[Any]:
    from kybernate.protos import cgroups_v1_metrics_pb2 as v1

    entries = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or ":" not in parts[0]:
            continue  # the "Total N" line
        major, minor = (int(n) for n in parts[0].split(":"))
        entries.append(v1.BlkIOEntry(op=parts[1], device=_block_device_name(major, minor),
                                     major=major, minor=minor, value=int(parts[2])))
    return entries


def _block_device_name(major: int, minor: int) -> str:
    with contextlib.suppress(OSError), open(f"/sys/dev/block/{major}:{minor}/uevent") as f:
        for line in f:
            if line.startswith("DEVNAME="):
                return "/dev/" + line.split("=", 1)[1].strip()
    return ""
