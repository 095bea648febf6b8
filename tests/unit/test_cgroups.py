"""Cgroups against the real kernel: v1 controllers and the (empty) unified hierarchy."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kybernate.errors import InvalidArgument
from kybernate.runtime.cgroups import (
    Cgroup,
    CgroupMounts,
    CgroupV1,
    CgroupV2,
    HierarchyMount,
    systemd_cgroup_path,
)

V1_CONTROLLERS = ("freezer", "memory", "pids", "cpu", "cpuacct", "blkio")
COUNTER = "read go; i=0; while :; do i=$((i+1)); echo $i > {file}; sleep 0.02; done"


@dataclass
class ScratchCgroup:
    """Directories made for one test, and the processes placed in them."""

    name: str
    dirs: dict[str, Path]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start `argv` blocked on stdin, move it into every directory, then release it."""
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE)
        self.procs.append(proc)
        for directory in self.dirs.values():
            (directory / "cgroup.procs").write_text(str(proc.pid))
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        return proc

    def cleanup(self) -> None:
        freezer = self.dirs.get("freezer")
        if freezer is not None and freezer.exists():
            (freezer / "freezer.state").write_text("THAWED")
        unified = self.dirs.get("unified")
        if unified is not None and unified.exists():
            (unified / "cgroup.freeze").write_text("0")
        for directory in self.dirs.values():
            procs = directory / "cgroup.procs"
            if procs.exists():
                for pid in procs.read_text().split():
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        for proc in self.procs:
            proc.kill()
            proc.wait()
        for directory in self.dirs.values():
            for _ in range(50):
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.05)  # children still exiting


@pytest.fixture
def mounts() -> CgroupMounts:
    return CgroupMounts.read()


@pytest.fixture
def v1(mounts: CgroupMounts) -> Iterator[ScratchCgroup]:
    name = f"kyb-cg-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    dirs = {c: Path(mounts.v1[c].mountpoint) / name for c in V1_CONTROLLERS}
    group = ScratchCgroup(name, dirs)
    try:
        for directory in dirs.values():
            directory.mkdir()
        yield group
    finally:
        group.cleanup()


@pytest.fixture
def v2(mounts: CgroupMounts) -> Iterator[ScratchCgroup]:
    assert mounts.v2 is not None, "this machine has a cgroup2 mount (hybrid layout)"
    name = f"kyb-cg2-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    group = ScratchCgroup(name, {"unified": Path(mounts.v2.mountpoint) / name})
    try:
        group.dirs["unified"].mkdir()
        yield group
    finally:
        group.cleanup()


def counter_value(path: Path) -> int:
    for _ in range(100):
        text = path.read_text().strip() if path.exists() else ""
        if text:
            return int(text)
        time.sleep(0.01)
    raise AssertionError(f"{path} stayed empty")


def test_mountinfo_parsing(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct\n"
        "37 31 0:34 /kubepods /mnt/my\\040freezer rw - cgroup cgroup rw,freezer\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    mounts = CgroupMounts.read(str(mountinfo))
    assert mounts.v1["cpu"] == mounts.v1["cpuacct"] == HierarchyMount("/sys/fs/cgroup/cpu,cpuacct", "/")
    assert mounts.v1["freezer"] == HierarchyMount("/mnt/my freezer", "/kubepods")
    assert mounts.v1["freezer"].directory("/kubepods/pod1/c1") == "/mnt/my freezer/pod1/c1"
    assert mounts.v2 == HierarchyMount("/sys/fs/cgroup/unified", "/")
    assert mounts.v2.directory("/a/b") == "/sys/fs/cgroup/unified/a/b"
    assert set(mounts.v1) == {"cpu", "cpuacct", "freezer"}


def test_systemd_paths() -> None:
    assert systemd_cgroup_path("system.slice:kyb:abc") == "/system.slice/kyb-abc.scope"
    assert systemd_cgroup_path("kubepods-besteffort.slice:cri-containerd:x") == (
        "/kubepods.slice/kubepods-besteffort.slice/cri-containerd-x.scope")
    with pytest.raises(InvalidArgument):
        systemd_cgroup_path("a:b")


def test_v1_find_by_pid_and_spec(v1: ScratchCgroup, tmp_path: Path) -> None:
    proc = v1.start(["sh", "-c", COUNTER.format(file=tmp_path / "n")])
    counter_value(tmp_path / "n")
    cgroup = Cgroup.for_pid(proc.pid)
    assert isinstance(cgroup, CgroupV1) and cgroup.version == 1
    for controller, directory in v1.dirs.items():
        assert cgroup.paths[controller] == str(directory)
    assert cgroup.freezer_path() == str(v1.dirs["freezer"])
    assert proc.pid in cgroup.pids()
    by_spec = Cgroup.from_spec({"linux": {"cgroupsPath": f"/{v1.name}"}})
    assert isinstance(by_spec, CgroupV1)
    assert by_spec.freezer_path() == str(v1.dirs["freezer"])
    assert proc.pid in by_spec.pids()
    with pytest.raises(InvalidArgument):
        Cgroup.from_spec({"linux": {}})


def test_v1_freeze_and_thaw(v1: ScratchCgroup, tmp_path: Path) -> None:
    counter = tmp_path / "n"
    proc = v1.start(["sh", "-c", COUNTER.format(file=counter)])
    counter_value(counter)
    cgroup = Cgroup.for_pid(proc.pid)

    async def body() -> None:
        await cgroup.freeze(timeout=10)
        assert cgroup.is_frozen()
        assert (v1.dirs["freezer"] / "freezer.state").read_text().strip() == "FROZEN"
        frozen_at = counter_value(counter)
        await asyncio.sleep(0.4)
        assert counter_value(counter) == frozen_at
        await cgroup.freeze(timeout=1)  # freezing a frozen cgroup is a no-op
        await cgroup.thaw(timeout=10)
        assert not cgroup.is_frozen()
        await asyncio.sleep(0.4)
        assert counter_value(counter) > frozen_at

    asyncio.run(body())


def test_v1_stats_read_real_values(v1: ScratchCgroup) -> None:
    (v1.dirs["pids"] / "pids.max").write_text("77")
    (v1.dirs["memory"] / "memory.limit_in_bytes").write_text(str(256 << 20))
    hog = ("import sys; sys.stdin.readline(); import time\n"
           "data = bytearray(40 << 20)\n"
           "for i in range(0, len(data), 4096): data[i] = 1\n"
           "t = time.process_time()\n"
           "while time.process_time() - t < 0.3: pass\n"
           "print('ready', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", hog], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    v1.procs.append(proc)
    for directory in v1.dirs.values():
        (directory / "cgroup.procs").write_text(str(proc.pid))
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == b"ready\n"

    metrics = Cgroup.for_pid(proc.pid).stats()
    assert type(metrics).DESCRIPTOR.full_name == "io.containerd.cgroups.v1.Metrics"
    assert metrics.pids.current == 1
    assert metrics.pids.limit == 77
    assert metrics.memory.usage.limit == 256 << 20
    assert metrics.memory.usage.usage >= 40 << 20
    assert metrics.memory.usage.max >= metrics.memory.usage.usage
    assert metrics.memory.rss >= 40 << 20 or metrics.memory.total_rss >= 40 << 20
    assert metrics.cpu.usage.total >= 200_000_000  # the 0.3 s busy loop, in ns
    assert metrics.cpu.usage.user > 0
    assert len(metrics.cpu.usage.per_cpu) == os.cpu_count()
    assert sum(metrics.cpu.usage.per_cpu) == pytest.approx(metrics.cpu.usage.total, rel=0.2)


def test_v1_oom_kill_is_reported(v1: ScratchCgroup) -> None:
    memory = v1.dirs["memory"]
    (memory / "memory.limit_in_bytes").write_text(str(32 << 20))
    hog = ("import sys; sys.stdin.readline()\n"
           "chunks = []\n"
           "while True:\n"
           "    chunks.append(bytearray(4 << 20))\n")
    cgroup = CgroupV1({"memory": str(memory)})

    async def body() -> None:
        events = cgroup.oom_events()
        first = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(0.1)  # the eventfd is registered by now
        assert not first.done()
        proc = v1.start([sys.executable, "-c", hog])
        await asyncio.wait_for(first, 15)
        for _ in range(100):
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        assert proc.returncode == -signal.SIGKILL
        assert cgroup.stats().memory_oom_control.oom_kill >= 1
        # Removing the cgroup ends the stream.
        following = asyncio.ensure_future(events.__anext__())
        memory.rmdir()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(following, 5)

    asyncio.run(body())


def test_v2_freeze_thaw_and_stats(v2: ScratchCgroup, tmp_path: Path) -> None:
    counter = tmp_path / "n"
    proc = v2.start(["sh", "-c", COUNTER.format(file=counter)])
    counter_value(counter)
    cgroup = Cgroup.for_pid(proc.pid, version=2)
    assert isinstance(cgroup, CgroupV2) and cgroup.version == 2
    assert cgroup.freezer_path() == str(v2.dirs["unified"])
    assert proc.pid in cgroup.pids()

    async def body() -> None:
        await cgroup.freeze(timeout=10)
        assert cgroup.is_frozen()
        assert "frozen 1" in (v2.dirs["unified"] / "cgroup.events").read_text()
        frozen_at = counter_value(counter)
        await asyncio.sleep(0.4)
        assert counter_value(counter) == frozen_at
        await cgroup.thaw(timeout=10)
        assert not cgroup.is_frozen()
        await asyncio.sleep(0.4)
        assert counter_value(counter) > frozen_at

    asyncio.run(body())
    metrics = cgroup.stats()
    assert type(metrics).DESCRIPTOR.full_name == "io.containerd.cgroups.v2.Metrics"
    assert metrics.cpu.usage_usec > 0
    assert metrics.cpu.usage_usec >= metrics.cpu.user_usec


FORKER = "read go; while :; do sleep 100 & sleep 0.01; done"


@pytest.mark.parametrize("frozen_first", [False, True], ids=["running", "frozen"])
def test_v1_kill_leaves_no_process_even_while_forking(v1: ScratchCgroup, frozen_first: bool) -> None:
    """Freeze, list, SIGKILL, thaw: a process forking as fast as it can cannot slip a
    child past the kill; a cgroup the agent left frozen dies too."""
    proc = v1.start(["sh", "-c", FORKER])
    cgroup = Cgroup.for_pid(proc.pid, version=1)
    assert isinstance(cgroup, CgroupV1)

    async def body() -> list[int]:
        while len(cgroup.pids()) < 5:
            await asyncio.sleep(0.02)
        if frozen_first:
            await cgroup.freeze(timeout=10)
        return await cgroup.kill(timeout=10)

    victims = asyncio.run(body())
    assert proc.pid in victims and len(victims) >= 5
    assert cgroup.pids() == []
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert cgroup.freezer_state() == "THAWED"


def test_v2_kill_uses_cgroup_kill(v2: ScratchCgroup) -> None:
    proc = v2.start(["sh", "-c", FORKER])
    cgroup = Cgroup.for_pid(proc.pid, version=2)
    assert (v2.dirs["unified"] / "cgroup.kill").exists(), "Linux 5.14 or newer"

    async def body() -> list[int]:
        while len(cgroup.pids()) < 5:
            await asyncio.sleep(0.02)
        await cgroup.freeze(timeout=10)  # frozen tasks die of cgroup.kill too
        return await cgroup.kill(timeout=10)

    victims = asyncio.run(body())
    assert proc.pid in victims
    assert cgroup.pids() == []
    assert proc.wait(timeout=10) == -signal.SIGKILL


def test_killing_a_removed_cgroup_is_a_no_op(v2: ScratchCgroup) -> None:
    cgroup = CgroupV2(str(v2.dirs["unified"] / "gone"))
    assert asyncio.run(cgroup.kill()) == []
