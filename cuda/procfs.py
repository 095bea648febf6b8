"""What /proc tells about a process that matters for CUDA: environment, NVIDIA device
files, run state and whether its cgroup is frozen."""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass

PROC = "/proc"
CGROUP_ROOT = "/sys/fs/cgroup"

# Character devices a CUDA process holds open: per-GPU nodes, the control node, UVM.
_NVIDIA_DEVICE_PREFIX = "/dev/nvidia"
# The NVIDIA kernel driver's character major: /dev/nvidiaN is minor N; 254 and 255 are
# nvidia-modeset and nvidiactl, which belong to no GPU.
NVIDIA_MAJOR = 195
_NVIDIA_GPU_MINORS = range(254)
NVIDIA_PROC_GPUS = "/proc/driver/nvidia/gpus"


def read_environ(pid: int, *, exec_grace: float = 1.0) -> dict[str, str] | None:
    """The process's initial environment, or None when it is gone or unreadable.

    A process caught inside execve (its parent's Popen returns once close-on-exec ran,
    before the kernel has laid out the new image's arguments and environment) shows an
    empty environ for a moment; an empty one is re-read for up to `exec_grace` seconds,
    which only a process started with no environment at all pays in full.
    """
    deadline = time.monotonic() + exec_grace
    while True:
        try:
            with open(f"{PROC}/{pid}/environ", "rb") as f:
                raw = f.read()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return None
        if raw:
            break
        if not is_alive(pid):  # a zombie has no memory left to show
            return None
        if time.monotonic() >= deadline:
            break
        time.sleep(0.002)
    env: dict[str, str] = {}
    for entry in raw.split(b"\0"):
        key, sep, value = entry.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def is_alive(pid: int) -> bool:
    """True for a live process; a zombie counts as gone."""
    state = run_state(pid)
    return state is not None and not state.startswith(("Z", "X"))


def run_state(pid: int) -> str | None:
    """The `State:` line of /proc/PID/status, e.g. "S (sleeping)"; None when gone."""
    try:
        with open(f"{PROC}/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return line.split(":", 1)[1].strip()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def holds_nvidia_device(pid: int) -> bool:
    """True when any open fd of the process points at /dev/nvidia* (nvidiactl, uvm, GPUs)."""
    fd_dir = f"{PROC}/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    for fd in fds:
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:  # fd closed meanwhile
            continue
        if target.startswith(_NVIDIA_DEVICE_PREFIX):
            return True
    return False


def held_gpu_minors(pid: int) -> set[int]:
    """Minor numbers of the /dev/nvidiaN GPU nodes the process holds open. The driver
    opens one for every GPU it can see, and a checkpoint covers exactly those; the
    device number is read through the fd, so names inside a container do not matter."""
    fd_dir = f"{PROC}/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return set()
    minors = set()
    for fd in fds:
        try:
            info = os.stat(f"{fd_dir}/{fd}")
        except OSError:  # closed meanwhile, or not ours to see
            continue
        if stat.S_ISCHR(info.st_mode) and os.major(info.st_rdev) == NVIDIA_MAJOR:
            minor = os.minor(info.st_rdev)
            if minor in _NVIDIA_GPU_MINORS:
                minors.add(minor)
    return minors


def gpu_uuids_by_minor(root: str = NVIDIA_PROC_GPUS) -> dict[int, str]:
    """Device minor -> GPU UUID from the kernel driver's per-GPU `information` files
    ("Device Minor: N", "GPU UUID: GPU-..."); empty where there is no driver."""
    try:
        entries = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return {}
    found: dict[int, str] = {}
    for entry in entries:
        try:
            with open(f"{root}/{entry}/information") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        minor = fields.get("Device Minor", "").strip()
        uuid = fields.get("GPU UUID", "").strip()
        if minor.isdigit() and uuid.startswith("GPU-"):
            found[int(minor)] = uuid
    return found


@dataclass(frozen=True)
class FreezeState:
    """How the process's cgroup freezer sees it."""

    frozen: bool
    freezer: str  # v1 freezer.state, "cgroup.freeze=1" for v2, or "" when there is none
    run_state: str  # /proc/PID/status State


def freeze_state(pid: int) -> FreezeState:
    """Whether the process's cgroup is frozen (or freezing), v1 freezer or v2 cgroup.freeze."""
    state = run_state(pid) or ""
    try:
        with open(f"{PROC}/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return FreezeState(False, "", state)
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if "freezer" in controllers.split(","):
            value = _read_first_line(f"{CGROUP_ROOT}/freezer{path}/freezer.state")
            if value is not None:
                # FREEZING counts: the tasks can no longer be relied on to answer.
                return FreezeState(value != "THAWED", value, state)
        if hierarchy == "0" and controllers == "":
            for root in (f"{CGROUP_ROOT}/unified", CGROUP_ROOT):
                value = _read_first_line(f"{root}{path}/cgroup.freeze")
                if value is not None:
                    if value == "1":
                        return FreezeState(True, "cgroup.freeze=1", state)
                    break
    return FreezeState(False, "", state)


def _read_first_line(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.readline().strip()
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None


def first_thread_id(pid: int) -> int | None:
    try:
        tids = sorted(int(t) for t in os.listdir(f"{PROC}/{pid}/task"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    return tids[0] if tids else None
