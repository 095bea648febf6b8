"""Checkpoint and restore through containerd: ctr -> containerd 1.7 -> the Kybernate
shim -> the node agent -> CRIU, and back through `runc restore`.

Every test runs against a private containerd whose environment names the fixture
agent's socket (KYBERNATE_AGENT_SOCKET: containerd passes its environment to shims),
a real `kybernate agent` with the fake CUDA backend, real runc and CRIU. The
workload keeps its state in memory only: a shell counter (its count in a shell
variable) and memhold (256 MiB of a seeded pattern, re-verified every second), so a
restore that lost memory or restarted the processes cannot pass.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.agent import AgentProcess, running_agent, temporary_workdir
from tests.support.containerd import KYBERNATE_RUNTIME, Containerd
from tests.support.events import CtrEvents
from tests.support.images import build_oci_archive, import_image
from tests.support.processes import GONE
from tests.support.waiting import wait_for as _wait
from tests.support.workloads import memhold_files

pytestmark = pytest.mark.integration

IMAGE_REF = "docker.io/kybernate/memhold:ckpt-test"
MEMHOLD_MIB = 256
CRIU_CHECKPOINT_MEDIA_TYPE = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
#: Counter and memhold; /tmp/before proves the writable layer travels with the checkpoint.
WORKLOAD = (
    f"echo written-before > /tmp/before; /bin/memhold {MEMHOLD_MIB} 7 /tmp/memhold & "
    "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done"
)


class AgentContainerd(Containerd):
    """A private containerd whose shims find the test's agent."""

    def __init__(self, agent_socket: Path, base: Path | None = None) -> None:
        super().__init__(base=base)
        self.agent_socket = agent_socket

    def environment(self) -> dict[str, str]:
        return {**super().environment(), "KYBERNATE_AGENT_SOCKET": str(self.agent_socket)}

    def bundle(self, container_id: str) -> Path:
        return self.state / "io.containerd.runtime.v2.task" / self.namespace / container_id

    def run(self, container_id: str, *args: str, options: tuple[str, ...] = ()) -> None:
        self.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME, *options, IMAGE_REF, container_id, *args,
                 check=True)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with temporary_workdir("kyb-ckpt-ctr") as path:
        yield path


@pytest.fixture(scope="module")
def image_archive(workdir: Path) -> Path:
    return build_oci_archive(workdir / "memhold-oci.tar", IMAGE_REF, extra_files=memhold_files())


@pytest.fixture(scope="module")
def agent(workdir: Path) -> Iterator[AgentProcess]:
    with running_agent(workdir, "node", extra_toml=f'[restore]\nallowed_roots = ["{workdir}"]\n') as agent:
        yield agent


def _start_containerd(agent: AgentProcess, archive: Path) -> AgentContainerd:
    instance = AgentContainerd(agent.socket)
    try:
        instance.start()
        import_image(instance, archive, IMAGE_REF)
    except BaseException:
        instance.stop()
        raise
    return instance


@pytest.fixture(scope="module")
def containerd(agent: AgentProcess, image_archive: Path) -> Iterator[AgentContainerd]:
    instance = _start_containerd(agent, image_archive)
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture
def names(containerd: AgentContainerd) -> Iterator[Callable[[str], str]]:
    """Unique container and image names; whatever a test leaves is removed after it."""
    made: list[str] = []

    def name(kind: str) -> str:
        made.append(f"kyb-{kind}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        return made[-1]

    try:
        yield name
    finally:
        _remove_containers(containerd, made)


def _remove_containers(containerd: Containerd, names: list[str]) -> None:
    listed = containerd.ctr("containers", "ls", "-q").stdout.split()
    for name in names:
        if name in listed:
            containerd.ctr("task", "kill", "-s", "SIGKILL", "--all", name)
            containerd.ctr("task", "delete", "--force", name)
            containerd.ctr("containers", "rm", name)
    images = containerd.ctr("images", "ls", "-q").stdout.split()
    doomed = [ref for ref in images if any(name in ref for name in names)]
    if doomed:
        containerd.ctr("images", "rm", "--sync", *doomed)


# -- observing the workload -------------------------------------------------------------


def _read(containerd: AgentContainerd, container_id: str, name: str) -> str:
    try:
        return (containerd.bundle(container_id) / "rootfs" / "tmp" / name).read_text().strip()
    except OSError:
        return ""


def _count(containerd: AgentContainerd, container_id: str) -> int:
    text = _read(containerd, container_id, "count")
    return int(text) if text.isdigit() else -1


def _memhold_rounds(containerd: AgentContainerd, container_id: str) -> int:
    """memhold's verified rounds; fails on a mismatch it reported."""
    status = _read(containerd, container_id, "memhold").split()
    assert not status or status[0] != "BAD", f"memhold found corrupted memory: {status}"
    return int(status[1]) if len(status) == 3 and status[0] == "ok" else 0


def _wait_running_workload(containerd: AgentContainerd, container_id: str, *, count: int = 10,
                           rounds: int = 1) -> None:
    _wait(f"{container_id} to count to {count}", lambda: _count(containerd, container_id) >= count)
    _wait(f"memhold in {container_id} to verify {rounds} round(s)",
          lambda: _memhold_rounds(containerd, container_id) >= rounds)


def _assert_continues(containerd: AgentContainerd, container_id: str, *, count_at_least: int,
                      rounds_above: int) -> None:
    """The restored processes go on from their checkpointed memory, not from scratch."""
    seen: list[int] = []
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        value = _count(containerd, container_id)
        if value >= 0:  # -1: caught between the shell's truncate and its write
            seen.append(value)
        time.sleep(0.05)
    assert seen, "the restored counter never wrote its file"
    # A restarted shell would rewrite the file with 1, 2, 3 within 0.1 s.
    assert min(seen) >= count_at_least, f"counter went back below {count_at_least}: {seen[:20]}"
    assert seen[-1] > seen[0], f"counter is not counting: {seen[:5]}..{seen[-5:]}"
    # memhold restarted would print "filled" and then round 1 again.
    _wait(f"memhold to verify past round {rounds_above}",
          lambda: _memhold_rounds(containerd, container_id) > rounds_above + 1)


def _remove(containerd: AgentContainerd, container_id: str) -> None:
    containerd.ctr("task", "kill", "-s", "SIGKILL", container_id)
    _wait(f"{container_id} to stop", lambda: containerd.task_status(container_id) in ("STOPPED", None))
    containerd.ctr("task", "delete", container_id, check=True)
    containerd.ctr("containers", "rm", container_id, check=True)


def _fail_with_logs(containerd: Containerd, agent: AgentProcess, what: str,
                    result: subprocess.CompletedProcess[str]) -> str:
    return (f"{what} failed ({result.returncode}): {result.stdout}{result.stderr}\n"
            f"--- containerd ---\n{containerd.log_tail(40)}\n--- agent ---\n{agent.log()[-4000:]}")


# -- the tests --------------------------------------------------------------------------


def test_container_checkpoint_and_live_restore(containerd: AgentContainerd, agent: AgentProcess,
                                               names: Callable[[str], str]) -> None:
    """`ctr container checkpoint --task --rw`, then `ctr container restore --live --rw`."""
    container_id, checkpoint_ref = names("live"), f"docker.io/kybernate/{names('live-ckpt')}:1"
    containerd.run(container_id, "sh", "-c", WORKLOAD)
    _wait_running_workload(containerd, container_id)
    containerd.ctr("task", "exec", "--exec-id", "write", container_id, "sh", "-c",
                   "echo from-exec > /written-by-exec", check=True)

    count_before = _count(containerd, container_id)
    rounds_before = _memhold_rounds(containerd, container_id)
    result = containerd.ctr("container", "checkpoint", "--task", "--rw", container_id, checkpoint_ref,
                            timeout=120)
    assert result.returncode == 0, _fail_with_logs(containerd, agent, "checkpoint", result)
    # containerd paused it around the checkpoint and resumed it: still running, still counting.
    assert containerd.task_status(container_id) == "RUNNING"
    _wait("the counter after the checkpoint",
          lambda: _count(containerd, container_id) > count_before + 3)
    committed = agent.settled_checkpoints()
    assert committed, "the agent committed nothing"
    assert json.loads((committed[-1] / "metadata.json").read_text())["container"]["id"] == container_id

    _remove(containerd, container_id)
    result = containerd.ctr("container", "restore", "--live", "--rw", container_id, checkpoint_ref,
                            timeout=120)
    assert result.returncode == 0, _fail_with_logs(containerd, agent, "restore", result)
    assert containerd.task_status(container_id) == "RUNNING"
    # containerd's unpacked copy of a checkpoint this node sealed is swapped for the
    # sealed copy, and removed at once: its memory is what CRIU allocates next.
    assert "sealed in the local tier; restoring that" in agent.log()
    _wait("containerd's copy to be removed", lambda: f"restore of {container_id}: removed containerd's checkpoint"
          in containerd.log_path.read_text(errors="replace"))
    _assert_continues(containerd, container_id, count_at_least=count_before, rounds_above=rounds_before)
    rootfs = containerd.bundle(container_id) / "rootfs"
    assert (rootfs / "tmp" / "before").read_text() == "written-before\n"
    assert (rootfs / "written-by-exec").read_text() == "from-exec\n"
    # The restored task is an ordinary task: exec and kill work.
    out = containerd.ctr("task", "exec", "--exec-id", "after", container_id, "cat", "/tmp/before", check=True)
    assert out.stdout.strip() == "written-before"
    _remove(containerd, container_id)


def _checkpoint_blob(containerd: AgentContainerd, image_ref: str, into: Path) -> Path:
    """Unpack the CRIU checkpoint layer of a checkpoint image from the content store."""
    index = json.loads(_content(containerd, _image_digest(containerd, image_ref)))
    layer = next(m for m in index["manifests"] if m["mediaType"] == CRIU_CHECKPOINT_MEDIA_TYPE)
    blob = _content(containerd, layer["digest"])
    into.mkdir(parents=True)
    archive = into.parent / f"{into.name}.tar"
    archive.write_bytes(blob)
    with tarfile.open(archive) as tar:
        tar.extractall(into)  # containerd's own layer: trusted (no filter on Python 3.11.2)
    archive.unlink()
    return into


def _content(containerd: Containerd, digest: str) -> bytes:
    return subprocess.run(containerd.ctr_argv("content", "get", digest), capture_output=True, check=True,
                          env=containerd.environment()).stdout


def _image_digest(containerd: Containerd, image_ref: str) -> str:
    listing = containerd.ctr("images", "ls", check=True).stdout.splitlines()
    row = next(line.split() for line in listing[1:] if line.split()[0] == image_ref)
    return next(field for field in row if field.startswith("sha256:"))


def _export_checkpoint(containerd: Containerd, image_ref: str, out: Path) -> Path:
    """An OCI layout tar of a checkpoint image. `ctr images export` cannot write one in
    1.7 (it parses every child of the index as a manifest), so build it from the
    content store: the checkpoint index as index.json, every blob beside it."""
    index_digest = _image_digest(containerd, image_ref)
    index_bytes = _content(containerd, index_digest)
    blobs = {index_digest: index_bytes}
    for child in json.loads(index_bytes)["manifests"]:
        blobs[child["digest"]] = _content(containerd, child["digest"])
    with tarfile.open(out, "w") as tar:
        def put(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        put("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        put("index.json", index_bytes)
        for digest, data in blobs.items():
            put(f"blobs/sha256/{digest.split(':', 1)[1]}", data)
    return out


def test_task_checkpoint_into_content_store_then_restore_from_it(
        containerd: AgentContainerd, agent: AgentProcess, names: Callable[[str], str], workdir: Path) -> None:
    """`ctr task checkpoint` (with the rootfs diff asked by annotation), then a new
    container restores that content-store checkpoint through `io.kybernate.restore-from`."""
    container_id, restored_id = names("task"), names("from-store")
    containerd.run(container_id, "sh", "-c", WORKLOAD,
                   options=("--annotation", "io.kybernate.checkpoint.rootfs-diff=true"))
    _wait_running_workload(containerd, container_id)
    count_before = _count(containerd, container_id)
    rounds_before = _memhold_rounds(containerd, container_id)
    result = containerd.ctr("task", "checkpoint", container_id, timeout=120)
    assert result.returncode == 0, _fail_with_logs(containerd, agent, "task checkpoint", result)
    image_ref = result.stdout.strip().splitlines()[-1]
    assert image_ref in containerd.ctr("images", "ls", "-q", check=True).stdout.split()
    _remove(containerd, container_id)

    try:
        directory = _checkpoint_blob(containerd, image_ref, workdir / f"{restored_id}-images")
        assert (directory / "metadata.json").is_file() and (directory / "rootfs-diff.tar").is_file()
        # A fresh container from the image: the rootfs diff brings /tmp/before back.
        containerd.run(restored_id, "sh", "-c", "exit 99",
                       options=("--annotation", f"io.kybernate.restore-from={directory}"))
        assert containerd.task_status(restored_id) == "RUNNING"
        _assert_continues(containerd, restored_id, count_at_least=count_before, rounds_above=rounds_before)
        assert _read(containerd, restored_id, "before") == "written-before"
        _remove(containerd, restored_id)
    finally:
        containerd.ctr("images", "rm", "--sync", image_ref)


def test_restore_on_a_second_containerd_from_the_exported_checkpoint(
        containerd: AgentContainerd, agent: AgentProcess, names: Callable[[str], str], workdir: Path,
        image_archive: Path) -> None:
    """Migration through containerd's own image transport: checkpoint, kill, delete,
    export; import into another containerd (its own root) and restore there."""
    container_id, checkpoint_ref = names("migrate"), f"docker.io/kybernate/{names('migrate-ckpt')}:1"
    containerd.run(container_id, "sh", "-c", WORKLOAD)
    _wait_running_workload(containerd, container_id)
    count_before = _count(containerd, container_id)
    rounds_before = _memhold_rounds(containerd, container_id)
    result = containerd.ctr("container", "checkpoint", "--task", "--rw", container_id, checkpoint_ref,
                            timeout=120)
    assert result.returncode == 0, _fail_with_logs(containerd, agent, "checkpoint", result)
    _remove(containerd, container_id)
    exported = _export_checkpoint(containerd, checkpoint_ref, workdir / f"{container_id}-checkpoint.tar")
    containerd.ctr("images", "rm", "--sync", checkpoint_ref, check=True)

    second = _start_containerd(agent, image_archive)
    try:
        # The index.json of the layout is the checkpoint index itself: kept under its name.
        second.ctr("images", "import", "--index-name", checkpoint_ref, "--all-platforms", "--no-unpack",
                   str(exported), timeout=120, check=True)
        result = second.ctr("container", "restore", "--live", "--rw", container_id, checkpoint_ref,
                            timeout=120)
        assert result.returncode == 0, _fail_with_logs(second, agent, "restore on the second containerd",
                                                       result)
        assert second.task_status(container_id) == "RUNNING"
        _assert_continues(second, container_id, count_at_least=count_before, rounds_above=rounds_before)
        assert _read(second, container_id, "before") == "written-before"
        _remove(second, container_id)
        # The shim exits once its last container is gone (grpc must not keep it alive).
        _wait("the second containerd's shim to exit", lambda: not second.shim_pids(), timeout=10)
    finally:
        forced = second.stop()
        exported.unlink(missing_ok=True)
    assert forced == [], f"the second containerd needed forced cleanup: {forced}"


def _pipe_stdio() -> tuple[list[int], tuple[int, int, int]]:
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    return [stdin_r, stdin_w, out_r, out_w, err_r, err_w], (stdin_r, out_w, err_w)


def _checkpoint_of(agent: AgentProcess, container_id: str, timeout: float = 60.0) -> Path:
    """The agent's committed checkpoint of `container_id`: Checkpoint returns once
    containerd has the images, and the agent's commit follows."""
    deadline = time.monotonic() + timeout
    while True:
        for directory in reversed(agent.committed_checkpoints()):
            metadata = json.loads((directory / "metadata.json").read_text())
            if metadata["container"]["id"] == container_id:
                return directory
        if time.monotonic() > deadline:
            raise AssertionError(f"no committed checkpoint of {container_id} in {agent.local_tier}")
        time.sleep(0.05)


def test_our_images_restore_with_stock_runc_and_with_our_shim(
        containerd: AgentContainerd, agent: AgentProcess, names: Callable[[str], str], workdir: Path) -> None:
    """The agent's images are runc's format: stock `runc restore` reads them outside
    containerd; then our shim restores the same checkpoint by registry name, and the
    restored task serves exec and kill."""
    container_id, restored_id = names("stock"), names("by-name")
    containerd.run(container_id, "sh", "-c", WORKLOAD, options=(
        "--annotation", "io.kybernate.checkpoint.exit=true",
        "--annotation", "io.kybernate.checkpoint.rootfs-diff=true"))
    _wait_running_workload(containerd, container_id)
    count_before = _count(containerd, container_id)
    rounds_before = _memhold_rounds(containerd, container_id)
    result = containerd.ctr("task", "checkpoint", container_id, timeout=120)
    assert result.returncode == 0, _fail_with_logs(containerd, agent, "task checkpoint", result)
    containerd.ctr("images", "rm", "--sync", result.stdout.strip().splitlines()[-1])
    # exit was asked: CRIU stopped the container and the shim published its exit.
    _wait(f"{container_id} to stop", lambda: containerd.task_status(container_id) == "STOPPED")
    images = _checkpoint_of(agent, container_id)
    checkpoint_name = json.loads((images / "metadata.json").read_text())["name"]

    # Stock runc, its own state root, containerd's bundle (the rootfs is still mounted).
    runc_root = workdir / f"{container_id}-runc"
    stock_id = f"{container_id}-stock"
    fds, stdio = _pipe_stdio()
    try:
        work = workdir / f"{stock_id}-work"
        work.mkdir()
        restored = subprocess.run(
            ["runc", "--root", str(runc_root), "restore", "--detach", "--file-locks", "--image-path", str(images),
             "--work-path", str(work), "--bundle", str(containerd.bundle(container_id)),
             "--pid-file", str(work / "pid"), stock_id],
            stdin=stdio[0], stdout=stdio[1], stderr=stdio[2], timeout=120, check=False)
        restore_log = work / "restore.log"
        assert restored.returncode == 0, (restore_log.read_text() if restore_log.exists() else "no restore.log")
        _assert_continues(containerd, container_id, count_at_least=count_before, rounds_above=rounds_before)
    finally:
        subprocess.run(["runc", "--root", str(runc_root), "delete", "--force", stock_id], check=False,
                       capture_output=True)
        for fd in fds:
            os.close(fd)
        shutil.rmtree(runc_root, ignore_errors=True)
    containerd.ctr("task", "delete", container_id, check=True)
    containerd.ctr("containers", "rm", container_id, check=True)

    # Our shim, from the registry by name: a fresh container from the image.
    containerd.run(restored_id, "sh", "-c", "exit 99",
                   options=("--annotation", f"io.kybernate.restore-from={checkpoint_name}"))
    assert containerd.task_status(restored_id) == "RUNNING"
    _assert_continues(containerd, restored_id, count_at_least=count_before, rounds_above=rounds_before)
    out = containerd.ctr("task", "exec", "--exec-id", "look", restored_id, "cat", "/tmp/before", check=True)
    assert out.stdout.strip() == "written-before"
    pids = containerd.ctr("task", "ps", restored_id, check=True).stdout.split()
    assert len(pids) >= 4, f"restored task lists too few processes: {pids}"  # header + sh, memhold, sleep
    containerd.ctr("task", "kill", "-s", "SIGKILL", restored_id, check=True)
    _wait(f"{restored_id} to stop", lambda: containerd.task_status(restored_id) == "STOPPED")
    containerd.ctr("task", "delete", restored_id, check=True)
    containerd.ctr("containers", "rm", restored_id, check=True)


def _cuda_events(agent: AgentProcess, token: str) -> list[dict[str, Any]]:
    return [e for e in agent.fake_events("lock", "checkpoint", "restore", "unlock")
            if e["token"] == token and e.get("ok", True)]


def test_gpu_container_is_locked_before_freeze_and_unlocked_before_running(
        containerd: AgentContainerd, agent: AgentProcess, names: Callable[[str], str]) -> None:
    """A container marked as a (fake) CUDA process: the GPU is locked and checkpointed
    while the container still runs (before the freeze and the dump), and after the
    restore it is restored and unlocked before containerd hears the task started."""
    container_id, checkpoint_ref = names("gpu"), f"docker.io/kybernate/{names('gpu-ckpt')}:1"
    token = f"tok-{uuid.uuid4().hex[:12]}"
    # With exit the GPU stays checkpointed in the images (as a real driver's state would
    # travel in them), so the restore must restore and unlock it.
    containerd.run(container_id, "/bin/memhold", "64", "5", "/tmp/memhold",
                   options=("--env", f"KYBERNATE_FAKE_CUDA={token}",
                            "--annotation", "io.kybernate.checkpoint.exit=true"))
    _wait(f"memhold in {container_id}", lambda: _memhold_rounds(containerd, container_id) >= 1)
    rounds_before = _memhold_rounds(containerd, container_id)

    result = containerd.ctr("container", "checkpoint", "--task", "--rw", container_id, checkpoint_ref,
                            timeout=120)
    assert result.returncode == 0, _fail_with_logs(containerd, agent, "checkpoint", result)
    events = _cuda_events(agent, token)
    # Pause took the lock (the pipeline found it locked) and the pipeline checkpointed the GPU.
    assert [e["action"] for e in events] == ["lock", "checkpoint"], events
    assert not any(e["frozen"] for e in events), f"a CUDA call met a frozen cgroup: {events}"
    images = _checkpoint_of(agent, container_id)
    dumped_at = (images / "inventory.img").stat().st_mtime
    assert events[1]["wall"] < dumped_at, "the GPU was checkpointed after the CRIU dump"

    _wait(f"{container_id} to stop", lambda: containerd.task_status(container_id) == "STOPPED")
    _remove(containerd, container_id)
    before_restore = len(events)
    result = containerd.ctr("container", "restore", "--live", "--rw", container_id, checkpoint_ref,
                            timeout=120)
    restored_at = time.time()
    assert result.returncode == 0, _fail_with_logs(containerd, agent, "restore", result)
    after = _cuda_events(agent, token)[before_restore:]
    assert [e["action"] for e in after] == ["restore", "unlock"], after
    assert all(e["wall"] < restored_at for e in after)
    task_pid = int(next(line.split()[1] for line in containerd.ctr("task", "ls", check=True).stdout.splitlines()
                        if line.split()[0] == container_id))
    assert {e["pid"] for e in after} == {task_pid}, "the restored init is the CUDA process"
    assert containerd.task_status(container_id) == "RUNNING"
    _wait("memhold after the restore", lambda: _memhold_rounds(containerd, container_id) > rounds_before + 1)
    _remove(containerd, container_id)
    containerd.ctr("images", "rm", "--sync", checkpoint_ref)


def test_unreachable_agent_fails_checkpoint_and_leaves_container_running(
        containerd: AgentContainerd, names: Callable[[str], str], workdir: Path) -> None:
    """The annotation names a socket nobody listens on: Unavailable naming it, and the
    container untouched (Pause went ahead without a GPU lock, Resume thawed it)."""
    container_id = names("noagent")
    socket = workdir / f"{container_id}.sock"
    containerd.run(container_id, "sh", "-c", WORKLOAD,
                   options=("--annotation", f"io.kybernate.agent-socket={socket}"))
    _wait_running_workload(containerd, container_id, count=3)
    result = containerd.ctr("task", "checkpoint", container_id, timeout=60)
    assert result.returncode != 0
    assert str(socket) in result.stderr and "untouched" in result.stderr, result.stderr
    assert containerd.task_status(container_id) == "RUNNING"
    count = _count(containerd, container_id)
    _wait("the counter to go on", lambda: _count(containerd, container_id) > count + 3)
    _remove(containerd, container_id)


def test_agent_deadline_after_gpu_checkpoint_kills_the_container(
        containerd: AgentContainerd, names: Callable[[str], str], workdir: Path) -> None:
    """The agent passes its deadline with the GPU checkpointed (MUST_KILL): the shim
    SIGKILLs every process, the exit is published, the checkpoint call fails saying so."""
    container_id = names("mustkill")
    with running_agent(workdir, f"hold-{container_id}", hold_after_phase={"gpu_checkpointed": 20}) as slow:
        containerd.run(container_id, "sh", "-c", WORKLOAD, options=(
            "--annotation", f"io.kybernate.agent-socket={slow.socket}",
            "--annotation", "io.kybernate.checkpoint.deadline-ms=1500"))
        _wait_running_workload(containerd, container_id, count=3)
        with CtrEvents(containerd) as events:
            result = containerd.ctr("task", "checkpoint", container_id, timeout=60)
            assert result.returncode != 0
            assert "killed" in result.stderr and "GPU_CHECKPOINTED" in result.stderr, result.stderr
            with contextlib.suppress(AssertionError):  # none within 15 s: the assert below shows what came
                events.wait_for_line(lambda line: " /tasks/exit " in line, timeout=15)
            seen = events.entries
        exits = [e.payload for e in seen if e.topic == "/tasks/exit"]
        assert [(e["container_id"], e["exit_status"]) for e in exits] == [(container_id, 137)], (
            f"{[e.line for e in seen]}\n--- containerd ---\n{containerd.log_tail(80)}")
        containerd.ctr("task", "delete", container_id, check=True)
        containerd.ctr("containers", "rm", container_id, check=True)
        assert not slow.committed_checkpoints()


def test_restore_refuses_foreign_checkpoint_and_cleans_up_after_gpu_restore_failure(
        containerd: AgentContainerd, agent: AgentProcess, names: Callable[[str], str], workdir: Path) -> None:
    """No metadata.json: refused before anything runs. CUDA restore failing after
    `runc restore`: the restored processes are killed, runc forgets them, Start fails
    with the driver's error and nothing is reported running."""
    foreign_id, source_id, restored_id = names("foreign"), names("gpu-src"), names("gpu-fail")
    foreign = workdir / f"{foreign_id}-images"
    foreign.mkdir()
    (foreign / "inventory.img").write_bytes(b"not ours")
    result = containerd.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME, "--annotation",
                            f"io.kybernate.restore-from={foreign}", IMAGE_REF, foreign_id, "true")
    assert result.returncode != 0 and "metadata.json" in result.stderr, result.stderr
    assert containerd.task_status(foreign_id) in (None, "CREATED", "STOPPED", "UNKNOWN")

    token = f"tok-{uuid.uuid4().hex[:12]}"
    containerd.run(source_id, "/bin/memhold", "32", "3", "/tmp/memhold", options=(
        "--env", f"KYBERNATE_FAKE_CUDA={token}", "--annotation", "io.kybernate.checkpoint.exit=true"))
    _wait(f"memhold in {source_id}", lambda: _memhold_rounds(containerd, source_id) >= 1)
    result = containerd.ctr("task", "checkpoint", source_id, timeout=120)
    assert result.returncode == 0, _fail_with_logs(containerd, agent, "task checkpoint", result)
    containerd.ctr("images", "rm", "--sync", result.stdout.strip().splitlines()[-1])
    name = json.loads((_checkpoint_of(agent, source_id) / "metadata.json").read_text())["name"]
    _wait(f"{source_id} to stop", lambda: containerd.task_status(source_id) == "STOPPED")
    _remove(containerd, source_id)

    (agent.fake_dir / "fail-restore").write_text("CUDA_ERROR_OUT_OF_MEMORY")
    try:
        result = containerd.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME, "--annotation",
                                f"io.kybernate.restore-from={name}", IMAGE_REF, restored_id, "true",
                                timeout=120)
    finally:
        (agent.fake_dir / "fail-restore").unlink(missing_ok=True)
    assert result.returncode != 0, "a restore whose GPU restore failed was reported started"
    assert "CUDA_ERROR_OUT_OF_MEMORY" in result.stderr and "killed" in result.stderr, result.stderr
    assert containerd.task_status(restored_id) != "RUNNING"
    runc_list = subprocess.run(["runc", "--root", str(containerd.runc_root()), "list", "-q"],
                               capture_output=True, text=True, check=False).stdout.split()
    assert restored_id not in runc_list, "runc still knows the failed restore"
    survivors = [pid for pid in os.listdir("/proc") if pid.isdigit() and _has_token(int(pid), token)]
    assert survivors == [], f"restored processes survived the failed restore: {survivors}"


def _has_token(pid: int, token: str) -> bool:
    try:
        return f"KYBERNATE_FAKE_CUDA={token}".encode() in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def test_open_file_of_the_writable_layer_restores_by_name_without_annotation(
        containerd: AgentContainerd, agent: AgentProcess, names: Callable[[str], str]) -> None:
    """The writable layer is part of every checkpoint of an overlay root: a shell that
    holds a file of it open (fd 3 on /tmp/held) restores into a fresh container by name,
    with no rootfs-diff annotation. Without the layer CRIU fails: "Can't open file
    tmp/held on restore"."""
    container_id, restored_id = names("held"), names("held-restored")
    containerd.run(container_id, "sh", "-c",
                   "exec 3>>/tmp/held; i=0; while true; do i=$((i+1)); echo $i >&3; "
                   "echo $i > /tmp/count; sleep 0.1; done")
    _wait(f"{container_id} to count", lambda: _count(containerd, container_id) >= 10)
    result = containerd.ctr("task", "checkpoint", container_id, timeout=120)
    assert result.returncode == 0, _fail_with_logs(containerd, agent, "task checkpoint", result)
    containerd.ctr("images", "rm", "--sync", result.stdout.strip().splitlines()[-1])
    images = _checkpoint_of(agent, container_id)
    metadata = json.loads((images / "metadata.json").read_text())
    assert metadata["options"]["rootfs_diff"] is True and "rootfs-diff.tar" in metadata["files"]
    count_before = _count(containerd, container_id)
    _remove(containerd, container_id)

    containerd.run(restored_id, "sh", "-c", "exit 99",
                   options=("--annotation", f"io.kybernate.restore-from={metadata['name']}"))
    assert containerd.task_status(restored_id) == "RUNNING", agent.log()[-3000:]
    _wait(f"{restored_id} to count on", lambda: _count(containerd, restored_id) > count_before + 3)
    # The held file grew on from the checkpointed layer: its first lines are the old ones.
    held = _read(containerd, restored_id, "held").split()
    assert held[:3] == ["1", "2", "3"] and int(held[-1]) > count_before
    _remove(containerd, restored_id)


def test_writable_layer_opt_out_by_annotation(
        containerd: AgentContainerd, agent: AgentProcess, names: Callable[[str], str]) -> None:
    """`io.kybernate.checkpoint.rootfs-diff=false`: the checkpoint holds no writable layer."""
    container_id = names("no-diff")
    containerd.run(container_id, "sh", "-c", "echo x > /tmp/x; sleep 600",
                   options=("--annotation", "io.kybernate.checkpoint.rootfs-diff=false"))
    _wait(f"{container_id} to write", lambda: _read(containerd, container_id, "x") == "x")
    result = containerd.ctr("task", "checkpoint", container_id, timeout=120)
    assert result.returncode == 0, _fail_with_logs(containerd, agent, "task checkpoint", result)
    containerd.ctr("images", "rm", "--sync", result.stdout.strip().splitlines()[-1])
    metadata = json.loads((_checkpoint_of(agent, container_id) / "metadata.json").read_text())
    assert metadata["options"]["rootfs_diff"] is False and "rootfs-diff.tar" not in metadata["files"]
    _remove(containerd, container_id)


# ---- lazy restore: the task runs before its memory is in (CRIU's lazy pages) --------------

#: Large enough that the daemon is still copying when the test kills it.
LAZY_MIB = 1024
LAZY_WORKLOAD = (
    f"/bin/memhold {LAZY_MIB} 11 /tmp/memhold & "
    "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done"
)


def daemons_of(bundle: Path) -> list[int]:
    """Live `criu lazy-pages` processes working for this bundle's restore."""
    return [proc.pid for proc in psutil.process_iter(["cmdline", "status"])
            if "lazy-pages" in (proc.info["cmdline"] or []) and proc.info["status"] not in GONE
            and any(str(bundle) in arg for arg in proc.info["cmdline"])]


def checkpointed_counter(containerd: AgentContainerd, agent: AgentProcess, source: str) -> tuple[str, int, int]:
    """(registry name, count, memhold rounds) of a counter checkpointed with `exit`."""
    containerd.run(source, "sh", "-c", LAZY_WORKLOAD, options=("--annotation", "io.kybernate.checkpoint.exit=true"))
    _wait("memhold to verify once", lambda: _memhold_rounds(containerd, source) >= 1, timeout=120)
    count, rounds = _count(containerd, source), _memhold_rounds(containerd, source)
    result = containerd.ctr("task", "checkpoint", source, timeout=300)
    assert result.returncode == 0, result.stderr
    containerd.ctr("images", "rm", "--sync", result.stdout.strip().splitlines()[-1])
    name = str(json.loads((_checkpoint_of(agent, source) / "metadata.json").read_text())["name"])
    _wait(f"{source} to stop", lambda: containerd.task_status(source) == "STOPPED")
    containerd.ctr("task", "delete", source, check=True)
    containerd.ctr("containers", "rm", source, check=True)
    return name, count, rounds


def lazy_run(containerd: AgentContainerd, container_id: str, name: str) -> None:
    containerd.run(container_id, "sh", "-c", "exit 99", options=(
        "--annotation", f"io.kybernate.restore-from={name}", "--annotation", "io.kybernate.restore.lazy=true"))


def test_a_lazy_restore_runs_at_once_and_the_daemon_brings_every_page(
        containerd: AgentContainerd, agent: AgentProcess, names: Callable[[str], str]) -> None:
    name, count, rounds = checkpointed_counter(containerd, agent, names("lazysrc"))
    restored = names("lazy")
    lazy_run(containerd, restored, name)
    assert containerd.task_status(restored) == "RUNNING"
    _assert_continues(containerd, restored, count_at_least=count, rounds_above=rounds)
    bundle = containerd.bundle(restored)
    _wait("the lazy-pages daemon to finish", lambda: not daemons_of(bundle), timeout=120)
    assert "lazy" in (bundle / "criu-restore" / "restore.log").read_text(errors="replace")
    # Every page arrived: memhold verifies its whole pattern again, and goes on.
    later = _memhold_rounds(containerd, restored)
    _wait("memhold to verify after the daemon left", lambda: _memhold_rounds(containerd, restored) > later, timeout=30)
    assert containerd.task_status(restored) == "RUNNING"


def kill_daemon_once_running(containerd: AgentContainerd, container_id: str, killed: list[int]) -> None:
    """As soon as the shim says the restored task runs while the daemon brings its memory
    in, SIGKILL that daemon (recording its pid if it was still alive then)."""
    deadline = time.monotonic() + 120
    bundle = containerd.bundle(container_id)
    while time.monotonic() < deadline:
        text = containerd.log_path.read_text(errors="replace")
        if f"restore of {container_id}: running" in text and "while criu lazy-pages" in text:
            for pid in daemons_of(bundle):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            return
        time.sleep(0.005)


def test_a_page_source_killed_mid_transfer_takes_the_container_with_it(
        containerd: AgentContainerd, agent: AgentProcess, names: Callable[[str], str]) -> None:
    name, _, _ = checkpointed_counter(containerd, agent, names("lazysrc"))
    doomed = names("lazykill")
    killed: list[int] = []
    killer = threading.Thread(target=kill_daemon_once_running, args=(containerd, doomed, killed))
    killer.start()
    containerd.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME, "--annotation", f"io.kybernate.restore-from={name}",
                   "--annotation", "io.kybernate.restore.lazy=true", IMAGE_REF, doomed, "sh", "-c", "exit 99")
    killer.join()
    # Alive when killed: it exits by itself only once every page is in.
    assert len(killed) == 1, "the daemon had finished before the test could kill it (raise LAZY_MIB)"
    _wait(f"{doomed} to be killed", lambda: containerd.task_status(doomed) == "STOPPED", timeout=60)
    cgroups = list(Path("/sys/fs/cgroup/pids").glob(f"**/{doomed}/cgroup.procs"))
    deadline = time.monotonic() + 10
    while any(p.exists() and p.read_text().split() for p in cgroups):
        assert time.monotonic() < deadline, "a restored process outlived its page source"
        time.sleep(0.05)
