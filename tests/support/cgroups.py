"""Reading a container's cgroups (ctr's cgroupsPath is /<namespace>/<id>) and freezer
state; hybrid v1 hierarchies and a pure cgroup2 mount are both understood."""

from __future__ import annotations

import contextlib
from pathlib import Path

from tests.support.containerd import Containerd

CGROUP_ROOT = Path("/sys/fs/cgroup")


def container_cgroups(ctd: Containerd, container_id: str) -> list[Path]:
    """Every cgroup directory of the container that exists now."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        candidates = [CGROUP_ROOT / ctd.namespace / container_id]
    else:
        candidates = [h / ctd.namespace / container_id for h in CGROUP_ROOT.iterdir()
                      if h.is_dir() and not h.is_symlink()]
    return [c for c in candidates if c.is_dir()]


def cgroup_pids(ctd: Containerd, container_id: str) -> set[int]:
    """Pids in any of the container's cgroups."""
    pids: set[int] = set()
    for cgroup in container_cgroups(ctd, container_id):
        with contextlib.suppress(OSError):
            pids.update(int(p) for p in (cgroup / "cgroup.procs").read_text().split())
    return pids


def freezer_state(ctd: Containerd, container_id: str) -> str:
    """THAWED, FREEZING or FROZEN, from the v1 freezer or cgroup2's cgroup.freeze."""
    state = CGROUP_ROOT / "freezer" / ctd.namespace / container_id / "freezer.state"
    if state.exists():
        return state.read_text().strip()
    unified = CGROUP_ROOT / ctd.namespace / container_id / "cgroup.freeze"
    return {"0": "THAWED", "1": "FROZEN"}[unified.read_text().strip()]


def freezer_state_path(pid: int) -> Path:
    """The v1 freezer.state file of the cgroup `pid` is in."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "freezer" in controllers.split(","):
            return CGROUP_ROOT / "freezer" / path.lstrip("/") / "freezer.state"
    raise AssertionError(f"pid {pid} has no v1 freezer cgroup (this suite expects hybrid cgroups)")
