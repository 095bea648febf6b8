"""The failure side of checkpoint and restore, through a real containerd, shim, agent,
runc and CRIU (DESIGN.md, "Failure modes, as tests must show them").

- The agent SIGKILLed while it holds at each phase of the pipeline (the agent's
  `[debug] hold_after_phase` fault injection), twenty times: the container is killed,
  its exit reported, nothing committed, the staging directory gone after the agent's
  restart, nothing left behind. And an agent that hangs (SIGSTOP): the shim's
  deadline kills the container.
- No agent when Checkpoint arrives: the error names the socket, the container runs on.
- A CUDA lock that times out: the error names the pid and the timeout; the container
  is unlocked, thawed and still running.
- A tampered checkpoint: the restore is refused before anything runs, naming the file.
- CRIU failing during restore: nothing left running, CRIU's own error line in the error.

The container's "GPU" is the fake CUDA backend: its processes carry the fake's
environment marker, and the agent drives the fake's state files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from kybernate.agent.commit import verify
from kybernate.api.client import AgentClient
from kybernate.cuda.fake import ENV_TOKEN
from kybernate.protos import agent_pb2
from kybernate.shim.agent_settings import ANNOTATION_AGENT_SOCKET, ANNOTATION_RESTORE_FROM
from kybernate.shim.verification_gate import SCRIPT_NAME

from tests.support.agent import AgentProcess, stopped_on_exit, temporary_workdir
from tests.support.cgroups import cgroup_pids, container_cgroups, freezer_state
from tests.support.containerd import KYBERNATE_RUNTIME, Containerd
from tests.support.events import CtrEvents
from tests.support.images import BUSYBOX_IMAGE_REF
from tests.support.processes import live_pids_with_marker
from tests.support.tasks import assert_task_running, private_containerd, remove_container, task_pid

pytestmark = pytest.mark.integration

RUN = ("run", "--runtime", KYBERNATE_RUNTIME)
ANNOTATION_GPU_LOCK_TIMEOUT = "io.kybernate.checkpoint.gpu-lock-timeout-ms"
ANNOTATION_EXIT = "io.kybernate.checkpoint.exit"
ANNOTATION_DEADLINE = "io.kybernate.checkpoint.deadline-ms"
HOLD_S = 120.0  # long enough that only our SIGKILL ends the hold

# Twenty kills in all, spread over the phases after which the agent can hold.
KILL_ROUNDS = {"accepted": 2, "admitted": 3, "gpu_locked": 3, "gpu_checkpointed": 3, "frozen": 3,
               "dumped": 3, "resumed": 3}
# Where each hold leaves the container: the fake CUDA state of its CUDA process and
# its freezer. containerd's Pause (which locks the GPU, then freezes) comes first.
STATE_WHILE_HOLDING = {
    "accepted": ("LOCKED", "FROZEN"),  # waiting for admission: untouched, as Pause left it
    "admitted": ("LOCKED", "FROZEN"),
    "gpu_locked": ("LOCKED", "THAWED"),
    "gpu_checkpointed": ("CHECKPOINTED", "THAWED"),
    "frozen": ("CHECKPOINTED", "FROZEN"),
    "dumped": ("CHECKPOINTED", "FROZEN"),
    "resumed": ("LOCKED", "FROZEN"),  # back as Pause left it, for the client's Resume
}
# What losing the agent there means: the container is killed unless the agent had said
# it was back (RESUMED); a checkpoint whose dump had finished is committed by the next
# agent from its staging directory.
KILLED_AFTER = {"accepted", "admitted", "gpu_locked", "gpu_checkpointed", "frozen", "dumped"}
COMMITTED_AFTER = {"dumped", "resumed"}
KILL_CASES = [(phase, n) for phase, count in KILL_ROUNDS.items() for n in range(1, count + 1)]


def two_sleepers(cuda_token: str) -> tuple[str, ...]:
    """An init and a child; the child is the "CUDA" process (the fake keeps its state
    per marker, so one marker is one CUDA process). The kill must reach both."""
    return ("sh", "-c", f"{ENV_TOKEN}={cuda_token} sleep 1000001 & exec sleep 1000002")


# ---- fixtures --------------------------------------------------------------------------------


class ScratchContainerd(Containerd):
    """A private containerd whose temporary checkpoint directories (`ctrd-checkpoint*`,
    for Checkpoint's destination and for restores, made under $XDG_RUNTIME_DIR) land in
    a directory of its own, so a test can look at exactly its destinations."""

    def __init__(self) -> None:
        super().__init__()
        self.scratch = self.base / "xdg"

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env["XDG_RUNTIME_DIR"] = str(self.scratch)
        return env

    def start(self, ready_timeout: float = 30.0) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)
        super().start(ready_timeout)


@pytest.fixture(scope="module")
def ctd(busybox_archive: Path) -> Iterator[ScratchContainerd]:
    with private_containerd(ScratchContainerd(), busybox_archive) as instance:
        yield instance


@pytest.fixture(scope="module")
def node() -> Iterator[AgentProcess]:
    """The node's agent files (socket, tiers, fake CUDA dir); tests start and stop it."""
    with temporary_workdir("kyb-faults") as workdir, \
            stopped_on_exit(AgentProcess.in_dir(workdir, "agent")) as agent:
        yield agent


@pytest.fixture
def agent(node: AgentProcess) -> Iterator[AgentProcess]:
    """The agent running with its plain config (no fault injection)."""
    node.write_config()
    node.start()
    try:
        yield node
    finally:
        node.cont()
        node.stop()


@pytest.fixture
def new_id(ctd: Containerd) -> Iterator[Callable[[], str]]:
    """Makes unique container ids; whatever they left in containerd is removed afterwards."""
    made: list[str] = []

    def make() -> str:
        container_id = f"kyb-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        made.append(container_id)
        return container_id

    yield make
    for container_id in made:
        remove_container(ctd, container_id)


@pytest.fixture
def checkpoint_refs(ctd: Containerd) -> Iterator[list[str]]:
    """Checkpoint images a test made in the content store, removed afterwards."""
    refs: list[str] = []
    yield refs
    for ref in refs:
        ctd.ctr("images", "rm", ref, timeout=30)


@pytest.fixture(scope="module")
def events(ctd: Containerd) -> Iterator[CtrEvents]:
    with CtrEvents(ctd) as watcher:
        yield watcher


# ---- helpers ---------------------------------------------------------------------------------


def run_container(ctd: Containerd, agent: AgentProcess, container_id: str, *command: str,
                  cuda_token: str | None = None, annotations: dict[str, str] | None = None,
                  extra: tuple[str, ...] = ()) -> int:
    """`ctr run -d` under Kybernate, pointed at the test's agent; returns the init pid."""
    args = [*RUN, "-d", "--annotation", f"{ANNOTATION_AGENT_SOCKET}={agent.socket}"]
    if cuda_token is not None:
        args += ["--env", f"{ENV_TOKEN}={cuda_token}"]
    for key, value in (annotations or {}).items():
        args += ["--annotation", f"{key}={value}"]
    ctd.ctr(*args, *extra, BUSYBOX_IMAGE_REF, container_id, *(command or ("sleep", "1000000")), check=True)
    ctd.wait_task_status(container_id, "RUNNING")
    return task_pid(ctd, container_id)


def exec_echo(ctd: Containerd, container_id: str, text: str = "alive") -> subprocess.CompletedProcess[str]:
    return ctd.ctr("task", "exec", "--exec-id", f"probe-{uuid.uuid4().hex[:6]}", container_id,
                   "echo", text, timeout=30)


@dataclass(frozen=True)
class ProcessIdentity:
    """A pid plus its start time: a recycled pid is not the same process."""

    pid: int
    started: float

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity:
        return cls(pid, psutil.Process(pid).create_time())

    def alive(self) -> bool:
        try:
            process = psutil.Process(self.pid)
            return process.create_time() == self.started and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False


def fake_cuda_state(agent: AgentProcess, token: str) -> str | None:
    record = agent.fake_dir / "processes" / f"{token}.json"
    if not record.exists():
        return None
    return str(json.loads(record.read_text()).get("state"))


def metadata_files(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("metadata.json")]


def staging_dirs(agent: AgentProcess) -> list[Path]:
    if not agent.local_tier.exists():
        return []
    return [p for p in agent.local_tier.iterdir() if p.name.startswith(".staging-")]


def checkpoint_images(ctd: Containerd) -> set[str]:
    return set(ctd.ctr("images", "ls", "-q", check=True).stdout.split()) - {BUSYBOX_IMAGE_REF}


def list_checkpoints(agent: AgentProcess) -> dict[str, agent_pb2.CheckpointRecord]:
    async def call() -> agent_pb2.ListCheckpointsResponse:
        async with AgentClient(agent.socket) as client:
            return await client.list_checkpoints(agent_pb2.ListCheckpointsRequest(), timeout=15)

    return {record.id: record for record in asyncio.run(call()).checkpoints}


def wait_for_hold(agent: AgentProcess, phase: str, log_offset: int, command: subprocess.Popen[str],
                  timeout: float = 60.0) -> None:
    """Until the agent's log says it holds after `phase` (written after that phase's report)."""
    needle = f"holding {HOLD_S:.1f}s after phase {phase}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in agent.log()[log_offset:]:
            return
        if command.poll() is not None:
            out, err = command.communicate()
            raise AssertionError(f"the checkpoint ended before the agent held at {phase}: rc "
                                 f"{command.returncode}\n{out}{err}\n--- agent ---\n{agent.log()[log_offset:]}")
        time.sleep(0.05)
    raise AssertionError(f"the agent never held at {phase}:\n{agent.log()[log_offset:]}")


def wait_for_shim_phase(ctd: Containerd, container_id: str, phase: str, timeout: float = 30.0) -> None:
    """Until the shim has logged (into containerd's log) the progress message of `phase`:
    the agent wrote it, but a message in flight is lost if the agent dies."""
    needle = f"checkpoint of {container_id}: {phase.upper()} after"
    wait_until(lambda: needle in ctd.log_path.read_text(errors="replace"), timeout,
               f"the shim to receive {phase.upper()}")


def both_sleeping(ctd: Containerd, container_id: str) -> bool:
    """Both processes of `two_sleepers` exist and have exec'ed `sleep` (before that, the
    child is a shell without the CUDA marker in its environment)."""
    pids = cgroup_pids(ctd, container_id)
    names = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            names.add(psutil.Process(pid).name())
    return len(pids) == 2 and names == {"sleep"}


def run_two_sleepers(ctd: Containerd, node: AgentProcess, container_id: str,
                     token: str) -> tuple[int, set[ProcessIdentity]]:
    """`two_sleepers` run under the node's agent, once both sleep in its cgroup (the
    shell forks its child right after runc starts it): the init pid and both processes."""
    init_pid = run_container(ctd, node, container_id, *two_sleepers(token))
    wait_until(lambda: both_sleeping(ctd, container_id), 15.0,
               f"both processes of {container_id} sleeping in its cgroup")
    return init_pid, {ProcessIdentity.of(pid) for pid in cgroup_pids(ctd, container_id)}


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def stop_checkpoint_and_agent(checkpoint: subprocess.Popen[str] | None, node: AgentProcess) -> None:
    """A test's cleanup: kill a `ctr task checkpoint` still running, then stop the agent
    (SIGCONT first: a SIGSTOPped agent would not see SIGTERM)."""
    if checkpoint is not None and checkpoint.poll() is None:
        checkpoint.kill()
        checkpoint.communicate()
    node.cont()
    node.stop()


def assert_nothing_left(ctd: Containerd, container_id: str) -> None:
    """After the task and container are deleted: no runc state, mount, cgroup or shim."""
    assert not (ctd.runc_root() / container_id).exists(), f"runc state of {container_id} left"
    mounts = [m for m in ctd.mounts_under(ctd.base, Path("/run/containerd")) if container_id in m]
    assert mounts == [], f"mounts left: {mounts}"
    assert container_cgroups(ctd, container_id) == [], f"cgroups left: {container_cgroups(ctd, container_id)}"
    wait_until(lambda: shims_of(ctd, container_id) == [], 30, f"the shim of {container_id} to exit")


def shims_of(ctd: Containerd, container_id: str) -> list[int]:
    """This containerd's shims started for `container_id` (its `-id` argument)."""
    found = []
    for pid in ctd.shim_pids():
        with contextlib.suppress(psutil.Error):
            argv = psutil.Process(pid).cmdline()
            if container_id in argv:
                found.append(pid)
    return found


# ---- the agent killed at each phase ----------------------------------------------------------


@pytest.mark.parametrize(("phase", "round_"), KILL_CASES, ids=[f"{p}-{n}" for p, n in KILL_CASES])
def test_agent_killed_while_holding_after_phase(ctd: ScratchContainerd, node: AgentProcess,
                                                events: CtrEvents, new_id, phase: str,
                                                round_: int) -> None:
    container_id = new_id()
    token = f"faults-{container_id}"
    node.write_config(hold_after_phase={phase: HOLD_S})
    log_offset = len(node.log())
    node.start()
    checkpoint: subprocess.Popen[str] | None = None
    try:
        init_pid, members = run_two_sleepers(ctd, node, container_id, token)
        assert len(members) == 2 and init_pid in {m.pid for m in members}, members
        images_before = checkpoint_images(ctd)
        committed_before = node.committed_checkpoints()
        scratch_before = set(ctd.scratch.glob("ctrd-checkpoint*"))

        checkpoint = subprocess.Popen(ctd.ctr_argv("task", "checkpoint", container_id),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=ctd.environment())
        wait_for_hold(node, phase, log_offset, checkpoint)
        wait_for_shim_phase(ctd, container_id, phase)
        staging = staging_dirs(node)
        assert len(staging) == 1, f"expected one staging dir while holding, found {staging}"
        attempt_id = staging[0].name.removeprefix(".staging-")
        assert (fake_cuda_state(node, token), freezer_state(ctd, container_id)) == STATE_WHILE_HOLDING[phase]
        destinations = sorted(set(ctd.scratch.glob("ctrd-checkpoint*")) - scratch_before)
        assert len(destinations) == 1, f"containerd's checkpoint destination not found: {destinations}"
        assert node.process is not None
        agent_helpers = [ProcessIdentity.of(c.pid) for c in psutil.Process(node.process.pid).children(recursive=True)]

        node.stop(signal.SIGKILL)

        out, err = checkpoint.communicate(timeout=60)
        assert checkpoint.returncode != 0, f"checkpoint reported success after the agent died:\n{out}"
        wait_until(lambda: not any(h.alive() for h in agent_helpers), 10, "the agent's helpers to die")
        if phase in KILLED_AFTER:
            assert "killed" in err, f"the error does not say the container was killed: {err}"
            # The exit is reported and the container is gone: every process, not just the init.
            _, exit_event = events.wait_for(container_id, "/tasks/exit")
            assert exit_event.get("pid") == init_pid, exit_event
            ctd.wait_task_status(container_id, "STOPPED")
            assert [m for m in members if m.alive()] == []
            assert cgroup_pids(ctd, container_id) == set()
            assert live_pids_with_marker(token) == []
        else:
            # Resumed as it was: it lives on, and ctr's Resume thawed it (its GPU
            # unlock waits for the agent).
            assert "killed" not in err, err
            assert "lost the kybernate agent" in err, err
            ctd.wait_task_status(container_id, "RUNNING")
            assert all(m.alive() for m in members), "a process of the container died"
            assert freezer_state(ctd, container_id) == "THAWED"

        # Nothing reached containerd: no metadata.json in its destination, no image.
        assert metadata_files(ctd.scratch, *destinations) == []
        assert checkpoint_images(ctd) == images_before

        # The next agent finds the leftover staging dir: a complete dump is committed,
        # anything else is marked failed and removed.
        node.write_config()
        node.start()
        assert staging_dirs(node) == []
        record = list_checkpoints(node).get(attempt_id)
        if phase in COMMITTED_AFTER:
            assert record is not None and record.state == "committed", record
            assert (node.local_tier / attempt_id / "metadata.json").is_file()
            assert verify(node.local_tier / attempt_id)["id"] == attempt_id
        else:
            assert record is not None and record.state == "failed", record
            assert node.committed_checkpoints() == committed_before
            assert not (node.local_tier / attempt_id).exists()

        if phase not in KILLED_AFTER:
            # The shim's GPU unlock reaches the restarted agent: nothing stays locked.
            wait_until(lambda: fake_cuda_state(node, token) == "RUNNING", 60, "the GPU unlock to get through")
            ctd.ctr("task", "kill", "-s", "KILL", container_id, check=True)
            ctd.wait_task_status(container_id, "STOPPED")
        ctd.ctr("task", "delete", container_id, check=True)
        ctd.ctr("containers", "rm", container_id, check=True)
        assert_nothing_left(ctd, container_id)
        assert live_pids_with_marker(token) == []
    finally:
        stop_checkpoint_and_agent(checkpoint, node)


def test_agent_hung_after_accepting_is_outlived_by_the_shim_deadline(
        ctd: ScratchContainerd, node: AgentProcess, events: CtrEvents, new_id) -> None:
    """A hung agent (SIGSTOP: its socket still accepts, nothing answers) after the
    container was frozen: the shim's own deadline (the container's deadline-ms plus a
    grace) kills the container, and the exit is reported."""
    container_id = new_id()
    token = f"hung-{container_id}"
    node.write_config(hold_after_phase={"frozen": HOLD_S})
    log_offset = len(node.log())
    node.start()
    checkpoint: subprocess.Popen[str] | None = None
    try:
        init_pid = run_container(ctd, node, container_id, *two_sleepers(token),
                                 annotations={ANNOTATION_DEADLINE: "5000"})
        # The shell forks its child right after runc starts it: wait for both.
        wait_until(lambda: both_sleeping(ctd, container_id), 15.0,
                   f"both processes of {container_id} sleeping in its cgroup")
        members = {ProcessIdentity.of(pid) for pid in cgroup_pids(ctd, container_id)}
        checkpoint = subprocess.Popen(ctd.ctr_argv("task", "checkpoint", container_id),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=ctd.environment())
        wait_for_hold(node, "frozen", log_offset, checkpoint)
        node.pause()
        started = time.monotonic()
        _, err = checkpoint.communicate(timeout=90)
        assert checkpoint.returncode != 0, "checkpoint reported success from a hung agent"
        assert "killed" in err, err
        assert time.monotonic() - started < 60
        _, exit_event = events.wait_for(container_id, "/tasks/exit")
        assert exit_event.get("pid") == init_pid, exit_event
        ctd.wait_task_status(container_id, "STOPPED")
        assert [m for m in members if m.alive()] == []
        assert live_pids_with_marker(token) == []
        assert node.committed_checkpoints() == [] or all(
            json.loads((d / "metadata.json").read_text())["container"]["id"] != container_id
            for d in node.committed_checkpoints())
    finally:
        stop_checkpoint_and_agent(checkpoint, node)


# ---- no agent when Checkpoint arrives --------------------------------------------------------


@pytest.mark.parametrize(("how", "command"), [
    pytest.param("stopped", ("task", "checkpoint"), id="stopped-task-checkpoint"),
    pytest.param("stopped", ("containers", "checkpoint", "--task"), id="stopped-container-checkpoint"),
    pytest.param("killed-stale-socket", ("task", "checkpoint"), id="stale-socket-task-checkpoint"),
])
def test_checkpoint_without_agent_leaves_the_container_running(
        ctd: ScratchContainerd, node: AgentProcess, new_id, checkpoint_refs: list[str],
        how: str, command: tuple[str, ...]) -> None:
    container_id = new_id()
    token = f"noagent-{container_id}"
    node.write_config()
    node.start()
    try:
        init_pid, members = run_two_sleepers(ctd, node, container_id, token)
        node.stop(signal.SIGKILL if how == "killed-stale-socket" else signal.SIGTERM)
        assert node.socket.exists() == (how == "killed-stale-socket")

        args = [*command, container_id]
        if command[0] == "containers":
            ref = f"kybernate-test/noagent:{container_id}"
            checkpoint_refs.append(ref)
            args.append(ref)
        result = ctd.ctr(*args, timeout=60)
        assert result.returncode != 0, f"checkpoint succeeded without an agent:\n{result.stdout}"
        assert str(node.socket) in result.stderr, result.stderr

        assert_task_running(ctd, container_id)
        assert task_pid(ctd, container_id) == init_pid
        assert all(m.alive() for m in members), "a process of the container died"
        assert freezer_state(ctd, container_id) == "THAWED"
        probe = exec_echo(ctd, container_id, "still-here")
        assert probe.returncode == 0 and probe.stdout.strip() == "still-here", probe.stderr
        assert metadata_files(ctd.scratch) == []
        assert checkpoint_images(ctd) == set()
    finally:
        node.stop()


# ---- CUDA lock timeout -----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["pause", "pipeline"])
def test_cuda_lock_timeout_leaves_the_container_running(ctd: ScratchContainerd, agent: AgentProcess,
                                                        new_id, where: str) -> None:
    """containerd pauses before it checkpoints, and our Pause takes the CUDA lock: a hung
    lock shows there first ("pause"). To reach the pipeline's own lock, the agent is
    stopped (SIGSTOP) while Pause runs, so Pause freezes without a lock, and continued
    before Checkpoint connects ("pipeline"): the pipeline thaws, locks and times out."""
    container_id = new_id()
    token = f"hang-{container_id}"
    timeout_ms = 700
    run_container(ctd, agent, container_id, "sh", "-c", f"{ENV_TOKEN}={token} exec sleep 1000000",
                  annotations={ANNOTATION_GPU_LOCK_TIMEOUT: str(timeout_ms)})
    cuda_pid = task_pid(ctd, container_id)
    committed_before = agent.committed_checkpoints()
    locks_before = len(agent.fake_events("lock"))
    (agent.fake_dir / "hang-lock").touch()
    try:
        if where == "pipeline":
            agent.pause()
        checkpoint = subprocess.Popen(ctd.ctr_argv("task", "checkpoint", container_id), text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ctd.environment())
        try:
            if where == "pipeline":
                wait_until(lambda: freezer_state(ctd, container_id) == "FROZEN", 20, "Pause to freeze")
                agent.cont()
            _, stderr = checkpoint.communicate(timeout=60)
        finally:
            agent.cont()
            if checkpoint.poll() is None:
                checkpoint.kill()
                checkpoint.communicate()
    finally:
        (agent.fake_dir / "hang-lock").unlink(missing_ok=True)
    assert checkpoint.returncode != 0, "checkpoint succeeded through a hung CUDA lock"
    assert f"pid {cuda_pid}" in stderr, stderr
    assert f"{timeout_ms} ms" in stderr, stderr
    locks = agent.fake_events("lock")[locks_before:]
    assert len(locks) == 1 and "timeout" in str(locks[0].get("error")), locks

    # Unlocked, thawed, running, responsive; nothing committed.
    assert freezer_state(ctd, container_id) == "THAWED"
    assert fake_cuda_state(agent, token) == "RUNNING"
    assert_task_running(ctd, container_id)
    assert task_pid(ctd, container_id) == cuda_pid
    probe = exec_echo(ctd, container_id)
    assert probe.returncode == 0 and probe.stdout.strip() == "alive", probe.stderr
    assert agent.committed_checkpoints() == committed_before
    assert staging_dirs(agent) == []

    # And it is checkpointable again once the GPU answers.
    again = ctd.ctr("task", "checkpoint", container_id, timeout=120)
    assert again.returncode == 0, again.stderr + agent.log()[-3000:]
    ctd.wait_task_status(container_id, "RUNNING", timeout=10)
    assert fake_cuda_state(agent, token) == "RUNNING"
    ref = again.stdout.strip().splitlines()[-1] if again.stdout.strip() else ""
    if ref:
        ctd.ctr("images", "rm", ref, timeout=30)


# ---- restore refused: a tampered checkpoint --------------------------------------------------


def flip_bytes(path: Path, offset: int = 0) -> None:
    """Invert a few bytes in place (same size, so only a checksum can tell)."""
    with path.open("r+b") as f:
        f.seek(offset)
        data = f.read(16)
        assert data, f"{path} is empty"
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def pages_image(directory: Path) -> Path:
    pages = sorted(directory.rglob("pages-*.img"), key=lambda p: p.stat().st_size, reverse=True)
    assert pages and pages[0].stat().st_size > 0, f"no non-empty pages-*.img in {directory}"
    return pages[0]


def committed_checkpoint_of(agent: AgentProcess, container_id: str, timeout: float = 60.0) -> Path:
    """The agent's committed checkpoint of `container_id` (the commit follows the
    Checkpoint call's return)."""
    deadline = time.monotonic() + timeout
    while True:
        for directory in agent.committed_checkpoints():
            metadata = json.loads((directory / "metadata.json").read_text())
            if metadata.get("container", {}).get("id") == container_id:
                return directory
        if time.monotonic() > deadline:
            raise AssertionError(f"no committed checkpoint of {container_id} in {agent.local_tier}")
        time.sleep(0.05)


def assert_nothing_ran(ctd: Containerd, container_id: str) -> None:
    """A refused restore: no runc container, no process in its cgroup, no running task."""
    runc = subprocess.run(["runc", "--root", str(ctd.runc_root()), "state", container_id],
                          capture_output=True, text=True, timeout=30, check=False)
    assert runc.returncode != 0, f"runc has a container {container_id}: {runc.stdout}"
    assert cgroup_pids(ctd, container_id) == set()
    assert ctd.task_status(container_id) in (None, "CREATED", "STOPPED", "UNKNOWN")


def assert_restore_never_ran(ctd: Containerd, container_id: str) -> None:
    """Refused at verification, before a restored task ran an instruction: runc restore
    never started (no CRIU log), or (a pages image, hashed while CRIU restores) CRIU
    held the restored tasks at post-restore and killed them when the hash failed."""
    assert_nothing_ran(ctd, container_id)
    bundle = ctd.state / "io.containerd.runtime.v2.task" / ctd.namespace / container_id
    logs = list(bundle.rglob("restore.log")) if bundle.exists() else []
    for log in logs:
        text = log.read_text(errors="replace")
        assert SCRIPT_NAME in text and "Aborting restore due to post-restore script" in text, (
            f"CRIU ran for a refused restore without holding its tasks: {log}\n{text[-2000:]}")


def checkpoint_into_tier(ctd: Containerd, agent: AgentProcess, container_id: str,
                         extra_run: tuple[str, ...] = (), command: tuple[str, ...] = ()) -> Path:
    """A container checkpointed with `ctr task checkpoint`; its committed local-tier dir."""
    run_container(ctd, agent, container_id, *command, extra=extra_run)
    result = ctd.ctr("task", "checkpoint", container_id, timeout=120)
    assert result.returncode == 0, result.stderr + agent.log()[-3000:]
    ref = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    if ref:
        ctd.ctr("images", "rm", ref, timeout=30)
    return committed_checkpoint_of(agent, container_id)


@pytest.mark.parametrize("source", ["directory", "registry-name"])
def test_restore_of_a_tampered_checkpoint_is_refused(ctd: ScratchContainerd, agent: AgentProcess,
                                                     new_id, tmp_path: Path, source: str) -> None:
    original = new_id()
    committed = checkpoint_into_tier(ctd, agent, original)
    remove_container(ctd, original)
    if source == "directory":
        agent.stop()
        agent.write_config(extra_toml=f'[restore]\nallowed_roots = ["{tmp_path}"]\n')
        agent.start()
        target = tmp_path / "checkpoint"
        shutil.copytree(committed, target)
        restore_from = str(target)
    else:
        target = committed
        restore_from = json.loads((committed / "metadata.json").read_text())["name"]
    pages = pages_image(target)
    flip_bytes(pages, offset=pages.stat().st_size // 2)

    restored = new_id()
    result = ctd.ctr(*RUN, "--annotation", f"{ANNOTATION_AGENT_SOCKET}={agent.socket}",
                     "--annotation", f"{ANNOTATION_RESTORE_FROM}={restore_from}",
                     "-d", BUSYBOX_IMAGE_REF, restored, "sleep", "1000000", timeout=120)
    assert result.returncode != 0, f"a tampered checkpoint was restored:\n{result.stdout}"
    assert pages.name in result.stderr, result.stderr
    assert_restore_never_ran(ctd, restored)


def content_blob(ctd: Containerd, digest: str) -> Path:
    algorithm, hex_digest = digest.split(":", 1)
    return ctd.root / "io.containerd.content.v1.content" / "blobs" / algorithm / hex_digest


def checkpoint_blob(ctd: Containerd, ref: str) -> Path:
    """The CRIU-image layer of a `ctr container checkpoint` image in the content store."""
    listing = ctd.ctr("images", "ls", check=True).stdout.splitlines()
    index_digest = next(line.split()[2] for line in listing[1:] if line.split()[0] == ref)
    index = json.loads(content_blob(ctd, index_digest).read_bytes())
    for manifest in index.get("manifests", []):
        if manifest.get("mediaType") == "application/vnd.containerd.container.criu.checkpoint.criu.tar":
            return content_blob(ctd, manifest["digest"])
    raise AssertionError(f"no CRIU checkpoint layer in {ref}: {index}")


def test_restore_of_a_tampered_content_store_checkpoint_is_refused(
        ctd: ScratchContainerd, agent: AgentProcess, new_id, checkpoint_refs: list[str]) -> None:
    original = new_id()
    run_container(ctd, agent, original)
    ref = f"kybernate-test/tampered:{original}"
    checkpoint_refs.append(ref)
    ctd.ctr("containers", "checkpoint", "--task", original, ref, check=True, timeout=120)
    remove_container(ctd, original)

    # containerd reads content back without re-hashing it: flip bytes inside the
    # tarred pages image, keeping the blob's size, as disk corruption would.
    blob = checkpoint_blob(ctd, ref)
    name, offset, size = pages_member(blob)
    flip_bytes(blob, offset + size // 2)

    # The node's own sealed copy of that checkpoint is what restores: containerd's
    # copy (listing the same files and digests) is never read.
    local = committed_checkpoint_of(agent, original)
    offset_log = len(agent.log())
    restored = new_id()
    ctd.ctr("containers", "restore", "--live", restored, ref, check=True, timeout=120)
    assert f"is a copy of checkpoint {local.name}, sealed in the local tier" in agent.log()[offset_log:]
    assert ctd.task_status(restored) == "RUNNING"
    remove_container(ctd, restored)

    # Without it, containerd's copy is verified, and refused naming the file.
    shutil.rmtree(local)
    refused = new_id()
    result = ctd.ctr("containers", "restore", "--live", refused, ref, timeout=120)
    assert result.returncode != 0, f"a tampered checkpoint was restored:\n{result.stdout}"
    assert Path(name).name in result.stderr, result.stderr
    assert_restore_never_ran(ctd, refused)


def pages_member(blob: Path) -> tuple[str, int, int]:
    with tarfile.open(blob, mode="r:") as tar:
        pages = [m for m in tar if m.isfile() and Path(m.name).name.startswith("pages-") and m.size > 0]
    assert pages, f"no pages-*.img in {blob}"
    largest = max(pages, key=lambda m: m.size)
    return largest.name, largest.offset_data, largest.size


# ---- restore: CRIU fails ---------------------------------------------------------------------


def test_criu_failure_at_restore_leaves_nothing_running(ctd: ScratchContainerd, agent: AgentProcess,
                                                        new_id, tmp_path: Path,
                                                        checkpoint_refs: list[str]) -> None:
    """A process holds a file open on a bind mount; the file's size changes between dump
    and restore. CRIU checks the size of every file it reopens and refuses."""
    shared = tmp_path / "shared"
    shared.mkdir()
    held = shared / "held"
    held.write_text("before\n")
    original = new_id()
    run_container(ctd, agent, original, "sh", "-c", "exec 3</data/held; exec sleep 1000000",
                  annotations={ANNOTATION_EXIT: "true"},
                  extra=("--mount", f"type=bind,src={shared},dst=/data,options=rbind:rw"))
    ref = f"kybernate-test/criufail:{original}"
    checkpoint_refs.append(ref)
    ctd.ctr("containers", "checkpoint", "--task", original, ref, check=True, timeout=120)
    remove_container(ctd, original)

    held.write_text("after the dump, longer\n")
    restored = new_id()
    result = ctd.ctr("containers", "restore", "--live", restored, ref, timeout=120)
    assert result.returncode != 0, f"the restore succeeded despite the changed file:\n{result.stdout}"
    criu_errors = criu_log_errors(result.stderr)
    assert_nothing_ran(ctd, restored)
    assert not [p for p in psutil.process_iter(["name"]) if p.info["name"] == "sleep"
                and str(held) in _open_files(p)]
    # CRIU's failing line is the cause ("File data/held has bad size ..."), not one of
    # the consequences it logs after it (rollback, "Restoring FAILED.").
    assert "bad size" in result.stderr and "data/held" in result.stderr, (
        result.stderr + "\n--- CRIU errors in the restore log ---\n" + criu_errors)


def _open_files(process: psutil.Process) -> str:
    try:
        return " ".join(f.path for f in process.open_files())
    except psutil.Error:
        return ""


def criu_log_errors(message: str) -> str:
    """The Error lines of the CRIU log an error message points at (for failure output)."""
    match = re.search(r"log file: (\S+?\.log)", message)
    if match is None:
        return "(no log file named)"
    try:
        lines = Path(match.group(1)).read_text(errors="replace").splitlines()
    except OSError as err:
        return f"({err})"
    return "\n".join(line for line in lines if "Error" in line or "bad size" in line)


# ---- an operator can always stop a container -------------------------------------------------


@pytest.mark.parametrize("how", [("task", "kill", "-s", "KILL"), ("task", "kill"), ("task", "delete", "--force")],
                         ids=["kill-KILL", "kill-TERM", "delete-force"])
def test_kill_during_a_hung_checkpoint_returns_at_once(ctd: ScratchContainerd, node: AgentProcess,
                                                      events: CtrEvents, new_id, how: tuple[str, ...]) -> None:
    """The agent holds the frozen, GPU-checkpointed container and then hangs (SIGSTOP).
    Kill (or delete --force, or kubelet's SIGTERM) does not wait behind the checkpoint:
    it aborts it, the container is SIGKILLed, the exit published, the checkpoint fails
    saying why; once the agent runs again it records the checkpoint failed."""
    container_id = new_id()
    token = f"abort-{container_id}"
    node.write_config(hold_after_phase={"frozen": HOLD_S})
    log_offset = len(node.log())
    node.start()
    checkpoint: subprocess.Popen[str] | None = None
    try:
        init_pid, members = run_two_sleepers(ctd, node, container_id, token)
        committed_before = node.committed_checkpoints()
        checkpoint = subprocess.Popen(ctd.ctr_argv("task", "checkpoint", container_id),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=ctd.environment())
        wait_for_hold(node, "frozen", log_offset, checkpoint)
        attempt_id = staging_dirs(node)[0].name.removeprefix(".staging-")
        node.pause()  # hung: its socket accepts, nothing answers

        # Well inside the hold (120 s) and the shim's own checkpoint deadline (30 min).
        stop = ctd.ctr(*how, container_id, timeout=30)
        assert stop.returncode == 0, stop.stderr
        _, exit_event = events.wait_for(container_id, "/tasks/exit")
        assert exit_event.get("pid") == init_pid and exit_event.get("exit_status") == 137, exit_event
        assert [m for m in members if m.alive()] == []
        assert cgroup_pids(ctd, container_id) == set()
        assert live_pids_with_marker(token) == []

        _, err = checkpoint.communicate(timeout=30)
        assert checkpoint.returncode != 0 and "abandoned" in err, err

        node.cont()  # the agent sees the shim gone: it records the checkpoint failed
        wait_until(lambda: (r := list_checkpoints(node).get(attempt_id)) is not None and r.state == "failed",
                   30, "the agent to record the abandoned checkpoint failed")
        wait_until(lambda: staging_dirs(node) == [], 15, "the staging directory to go")
        assert node.committed_checkpoints() == committed_before

        if ctd.task_status(container_id) is not None:
            ctd.ctr("task", "delete", container_id, check=True)
        ctd.ctr("containers", "rm", container_id, check=True)
        assert_nothing_left(ctd, container_id)
    finally:
        stop_checkpoint_and_agent(checkpoint, node)


def test_a_checkpoint_of_a_container_paused_without_a_gpu_lock_leaves_no_lock(
        ctd: ScratchContainerd, agent: AgentProcess, new_id) -> None:
    """Pause found no agent (it was hung: SIGSTOP) and froze without locking CUDA; the
    agent answers again by Checkpoint. The pipeline thaws, locks, dumps, and gives the
    container back frozen as Pause left it: unlocked, since Pause had taken no lock, so
    that the client's Resume, which has nothing to unlock, leaves CUDA running."""
    container_id = new_id()
    token = f"nolock-{container_id}"
    run_container(ctd, agent, container_id, "sh", "-c", f"{ENV_TOKEN}={token} exec sleep 1000000")
    committed_before = agent.committed_checkpoints()
    agent.pause()
    checkpoint = subprocess.Popen(ctd.ctr_argv("task", "checkpoint", container_id), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ctd.environment())
    try:
        wait_until(lambda: freezer_state(ctd, container_id) == "FROZEN", 30, "Pause to freeze without a lock")
        assert fake_cuda_state(agent, token) in (None, "RUNNING"), "never locked"
        agent.cont()
        out, err = checkpoint.communicate(timeout=120)
    finally:
        agent.cont()
        if checkpoint.poll() is None:
            checkpoint.kill()
            checkpoint.communicate()
    assert checkpoint.returncode == 0, err + agent.log()[-3000:]
    ctd.wait_task_status(container_id, "RUNNING", timeout=10)
    assert freezer_state(ctd, container_id) == "THAWED"
    assert fake_cuda_state(agent, token) == "RUNNING", "no CUDA lock is left behind"
    assert len(agent.settled_checkpoints()) == len(committed_before) + 1
    if out.strip():
        ctd.ctr("images", "rm", out.strip().splitlines()[-1], timeout=30)
