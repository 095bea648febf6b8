"""The forking template under a real containerd: the first container's shim is spawned
and launches the template, later ones are forked from it, they behave the same, and
nothing of the template outlives its containerd."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kybernate.shim import template as template_module
from kybernate.shim.flags import SHIM_NAME
from kybernate.shim.template import template_socket_path

from tests.support.containerd import KYBERNATE_RUNTIME, Containerd, command_line
from tests.support.images import BUSYBOX_IMAGE_REF, import_image
from tests.support.tasks import private_containerd

RUN = ("run", "--runtime", KYBERNATE_RUNTIME)
# A forked server shares the template's heap (imports, frozen objects) copy-on-write;
# a spawned one shares no dirty page with anybody.
FORKED_SHARED_DIRTY_KIB = 2048
PIDS_CGROUP_ROOT = Path("/sys/fs/cgroup/pids")


@pytest.fixture(scope="module")
def ctd(busybox_archive: Path) -> Iterator[Containerd]:
    with private_containerd(Containerd(), busybox_archive) as instance:
        yield instance


@pytest.fixture
def container_ids(ctd: Containerd) -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for container_id in made:
        if ctd.task_status(container_id) is not None:
            ctd.ctr("task", "kill", "-s", "SIGKILL", "--all", container_id, timeout=30)
            ctd.ctr("task", "delete", "--force", container_id, timeout=30)
        ctd.ctr("containers", "rm", container_id, timeout=30)


def new_id(made: list[str]) -> str:
    container_id = f"kyb-tpl-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    made.append(container_id)
    return container_id


def serving_shim(ctd: Containerd, container_id: str) -> int:
    shims = ctd.shims_serving(container_id)
    assert len(shims) == 1, shims
    return shims[0]


def shared_dirty_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Shared_Dirty:"):
            return int(line.split()[1])
    raise AssertionError(f"no Shared_Dirty for {pid}")


def wait_for_template(ctd: Containerd, not_pid: int = 0, timeout: float = 30.0) -> int:
    """The template's pid, once it listens."""
    interpreter = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "python3")
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in ctd.template_pids() if p != not_pid]
        paths = {template_socket_path(ctd.address, sys.executable),
                 template_socket_path(ctd.address, interpreter)}
        if len(pids) == 1 and any(os.path.exists(p) for p in paths):
            return pids[0]
        assert time.monotonic() < deadline, f"no template after {timeout}s: {pids}"
        time.sleep(0.05)


def start_sleeper(ctd: Containerd, made: list[str]) -> tuple[str, int]:
    container_id = new_id(made)
    ctd.ctr(*RUN, "-d", BUSYBOX_IMAGE_REF, container_id, "sleep", "600", check=True)
    ctd.wait_task_status(container_id, "RUNNING")
    return container_id, serving_shim(ctd, container_id)


def assert_titled_as_containerds_shims(ctd: Containerd, shim: int, container_id: str) -> None:
    """ps shows the serving process as containerd's Go shims show theirs, and
    `pgrep containerd-shim` finds it."""
    assert command_line(shim) == [SHIM_NAME, "-namespace", ctd.namespace, "-id", container_id,
                                  "-address", ctd.address]
    assert Path(f"/proc/{shim}/comm").read_text() == "containerd-shim\n"
    found = subprocess.run(["pgrep", "containerd-shim"], capture_output=True, text=True, check=False)
    assert str(shim) in found.stdout.split()


def stop_sleeper(ctd: Containerd, container_id: str) -> None:
    ctd.ctr("task", "kill", "-s", "SIGKILL", container_id, check=True)
    ctd.wait_task_status(container_id, "STOPPED")
    ctd.ctr("task", "delete", container_id, check=True)
    ctd.ctr("containers", "rm", container_id, check=True)


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie its new parent has not reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def cgroup_line(pid: int, controller: str) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if controller in line.split(":")[1].split(","):
            return line
    raise AssertionError(f"pid {pid} has no {controller} cgroup")


def test_first_start_spawns_and_launches_the_template_later_ones_fork(
        ctd: Containerd, container_ids: list[str]) -> None:
    assert ctd.template_pids() == []
    first, first_shim = start_sleeper(ctd, container_ids)
    assert shared_dirty_kib(first_shim) < FORKED_SHARED_DIRTY_KIB  # spawned: no template yet
    assert_titled_as_containerds_shims(ctd, first_shim, first)
    template = wait_for_template(ctd)

    # Put the template in a cgroup of its own: a forked server is born there, and
    # `start` must move it where a spawned one is born, containerd's cgroups.
    own_cgroup = PIDS_CGROUP_ROOT / f"kyb-tpl-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    own_cgroup.mkdir()
    try:
        (own_cgroup / "cgroup.procs").write_text(str(template))
        second, second_shim = start_sleeper(ctd, container_ids)
        assert shared_dirty_kib(second_shim) >= FORKED_SHARED_DIRTY_KIB
        assert_titled_as_containerds_shims(ctd, second_shim, second)
        assert cgroup_line(second_shim, "pids") == cgroup_line(ctd.pid, "pids")
        assert cgroup_line(second_shim, "memory") == cgroup_line(ctd.pid, "memory")
        # Detached like a spawned server: own session, not the template's child.
        assert os.getsid(second_shim) == second_shim
        stat = Path(f"/proc/{second_shim}/stat").read_text()
        assert int(stat[stat.rindex(")") + 2:].split()[1]) != template
        assert Path(f"/proc/{second_shim}/cwd").resolve() == (
            ctd.state / "io.containerd.runtime.v2.task" / ctd.namespace / second)
        ours = int(Path(f"/proc/{ctd.pid}/oom_score_adj").read_text())
        assert int(Path(f"/proc/{second_shim}/oom_score_adj").read_text()) == min(ours + 1, 1000)
    finally:
        if (own_cgroup / "cgroup.procs").exists():
            for pid in (own_cgroup / "cgroup.procs").read_text().split():
                (PIDS_CGROUP_ROOT / "cgroup.procs").write_text(pid)
            own_cgroup.rmdir()
    stop_sleeper(ctd, first)
    stop_sleeper(ctd, second)
    assert ctd.template_pids() == [template]  # it outlives containers


def test_forked_shims_run_containers_like_spawned_ones(ctd: Containerd,
                                                       container_ids: list[str]) -> None:
    for _ in range(3):
        container_id = new_id(container_ids)
        result = ctd.ctr(*RUN, "--rm", BUSYBOX_IMAGE_REF, container_id, "sh", "-c",
                         "echo out-$((6*7)); echo err >&2; exit 3")
        assert result.returncode == 3, result.stderr
        assert result.stdout == "out-42\n"
        assert "err" in result.stderr
    template = wait_for_template(ctd)
    sleeper, shim = start_sleeper(ctd, container_ids)
    assert shared_dirty_kib(shim) >= FORKED_SHARED_DIRTY_KIB
    exec_result = ctd.ctr("task", "exec", "--exec-id", "e1", sleeper, "echo", "from-exec")
    assert (exec_result.returncode, exec_result.stdout) == (0, "from-exec\n"), exec_result.stderr
    stop_sleeper(ctd, sleeper)
    assert ctd.template_pids() == [template]


def test_changed_source_retires_the_template(ctd: Containerd, container_ids: list[str]) -> None:
    ctd.ctr(*RUN, "--rm", BUSYBOX_IMAGE_REF, new_id(container_ids), "true", check=True)
    old = wait_for_template(ctd)
    source = Path(template_module.__file__)
    before = source.stat()
    try:
        # Only the mtime moves (restored below); to the template its code is stale now.
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        container_id, shim = start_sleeper(ctd, container_ids)
    finally:
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert shared_dirty_kib(shim) < FORKED_SHARED_DIRTY_KIB  # refused: spawned instead
    deadline = time.monotonic() + 10
    while alive(old):
        assert time.monotonic() < deadline, "stale template did not exit"
        time.sleep(0.05)
    assert wait_for_template(ctd, not_pid=old) != old  # and a fresh one took over
    stop_sleeper(ctd, container_id)


def test_nothing_of_the_template_outlives_its_containerd(busybox_archive: Path) -> None:
    instance = Containerd()
    try:
        instance.start()
        import_image(instance, busybox_archive)
        instance.ctr(*RUN, "--rm", BUSYBOX_IMAGE_REF, f"kyb-tpl-{os.getpid()}-once", "true",
                     check=True)
        template = wait_for_template(instance)
        argv0 = command_line(template)[0]
        path = template_socket_path(instance.address, argv0)
        assert os.path.exists(path)
    finally:
        forced = instance.stop()
    assert not [f for f in forced if f.startswith("shim pid")], forced
    assert not alive(template)
    assert not os.path.exists(path)
    assert instance.template_pids() == []


def _delete_command(ctd: Containerd, bundle: Path) -> list[str]:
    """The shim's `delete` as containerd runs it, with -X importtime on stderr."""
    return [sys.executable, "-X", "importtime", "-m", "kybernate.shim", "-namespace", ctd.namespace,
            "-address", ctd.address, "-publish-binary", "/usr/bin/containerd", "-id",
            f"kyb-tpl-gone-{uuid.uuid4().hex[:6]}", "-bundle", str(bundle), "delete"]


def test_delete_is_relayed_to_the_template_and_runs_alone_without_one(
        ctd: Containerd, container_ids: list[str], tmp_path: Path) -> None:
    import subprocess

    from kybernate.protos import shim_pb2

    ctd.ctr(*RUN, "--rm", BUSYBOX_IMAGE_REF, new_id(container_ids), "true", check=True)
    template = wait_for_template(ctd)
    relayed = subprocess.run(_delete_command(ctd, tmp_path), capture_output=True, timeout=60, check=False,
                             env={**os.environ, "TTRPC_ADDRESS": ctd.address + ".ttrpc"})
    assert relayed.returncode == 0, relayed.stderr
    assert shim_pb2.DeleteResponse.FromString(relayed.stdout).exit_status == 137
    imports = relayed.stderr.decode()
    assert "kybernate.shim.relay" in imports and "kybernate.shim.delete" not in imports
    assert ctd.template_pids() == [template]

    # Without a template the command does the work itself, with the same answer.
    os.kill(template, 15)
    deadline = time.monotonic() + 10
    while alive(template):
        assert time.monotonic() < deadline, "template did not stop"
        time.sleep(0.05)
    alone = subprocess.run(_delete_command(ctd, tmp_path), capture_output=True, timeout=60, check=False)
    assert alone.returncode == 0, alone.stderr
    assert shim_pb2.DeleteResponse.FromString(alone.stdout).exit_status == 137
    assert "kybernate.shim.delete" in alone.stderr.decode()
