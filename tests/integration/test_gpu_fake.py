"""GPU checkpoint and restore through the real containerd, runc and CRIU, with the fake
CUDA backend standing in for the driver (issue 4's CI evidence).

A container becomes a "CUDA process" for the fake by `ctr run --env
KYBERNATE_FAKE_CUDA=<token>`; the fake then holds KYBERNATE_FAKE_CUDA_MEM bytes for it
on a fake GPU (no real memory is used, so the numbers can be large). What each test
shows comes from three independent witnesses, all on the same wall clock:

- the fake's event log (every lock, checkpoint, restore and unlock call, with whether
  the caller's cgroup was frozen at that moment);
- a thread sampling the container's freezer.state every millisecond;
- containerd's own view: `ctr events` timestamps and `ctr task ls`.

The CRIU dump's time is the modification time of its image files in the committed
checkpoint (the kernel stamps them from its coarse clock, so they may read up to a
tick early: FS_CLOCK_SLACK_S).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import pytest
from kybernate.cuda.fake import FakeBackend

from tests.support.agent import AgentProcess, stopped_on_exit, temporary_workdir
from tests.support.cgroups import freezer_state_path
from tests.support.containerd import KYBERNATE_RUNTIME, Containerd
from tests.support.events import CtrEvents
from tests.support.images import BUSYBOX_IMAGE_REF
from tests.support.processes import live_pids_with_marker
from tests.support.tasks import private_containerd, task_pid

pytestmark = pytest.mark.integration

GIB = 1 << 30
MODEL = "Fake H100"
OTHER_MODEL = "Fake A100"
GPU_A = "GPU-a0a0a0a0-0000-4000-8000-00000000000a"
GPU_B = "GPU-b0b0b0b0-0000-4000-8000-00000000000b"
GPU_C = "GPU-c0c0c0c0-0000-4000-8000-00000000000c"
CONTAINER_GPU_MEMORY = 6 * GIB  # the agent checks disk space for it: keep it modest
LOCK_TIMEOUT_MS = 800
FS_CLOCK_SLACK_S = 0.012
CUDA_ACTIONS = ("lock", "checkpoint", "restore", "unlock")
PHASE_ORDER = ["accepted", "gpu_locked", "gpu_checkpointed", "frozen", "dumped"]


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ctd(busybox_archive: Path) -> Iterator[Containerd]:
    """A private containerd for this module (agents and shims come and go per test)."""
    with private_containerd(Containerd(), busybox_archive) as instance:
        yield instance


@pytest.fixture
def node() -> Iterator[AgentProcess]:
    """A real agent with the fake CUDA backend and one 80 GiB fake GPU of MODEL."""
    with temporary_workdir("kyb-gpu-it") as workdir, \
            stopped_on_exit(AgentProcess.in_dir(workdir, "node", lock_timeout_ms=5000)) as agent:
        write_gpus(agent, [(GPU_A, MODEL, 80 * GIB)])
        agent.start()
        yield agent


@pytest.fixture
def events(ctd: Containerd) -> Iterator[CtrEvents]:
    with CtrEvents(ctd) as log:
        yield log


@pytest.fixture
def containers(ctd: Containerd, node: AgentProcess) -> Iterator[Containers]:
    made = Containers(ctd, node)
    try:
        yield made
    finally:
        made.remove_all()


# -- helpers --------------------------------------------------------------------------


def write_gpus(agent: AgentProcess, gpus: list[tuple[str, str, int]]) -> None:
    FakeBackend(agent.fake_dir).write_gpus(
        [{"uuid": uuid_, "model": model, "memory_total": total} for uuid_, model, total in gpus])


def fake_gpus(agent: AgentProcess) -> dict[str, Any]:
    """The fake inventory (free memory included) by UUID; logs no CUDA call."""
    return {gpu.uuid: gpu for gpu in FakeBackend(agent.fake_dir).gpus()}


def fake_record(agent: AgentProcess, token: str) -> dict[str, Any]:
    """The fake driver's state of one CUDA process (one token)."""
    return json.loads((agent.fake_dir / "processes" / f"{token}.json").read_text())


def cuda_calls(agent: AgentProcess, token: str, since: float = 0.0) -> list[dict[str, Any]]:
    """Lock/checkpoint/restore/unlock calls for `token` (get-state left out), oldest first."""
    return [e for e in agent.fake_events(*CUDA_ACTIONS) if e["token"] == token and e["wall"] >= since]


def dump_time(checkpoint: Path) -> float:
    """When CRIU wrote its first image file (its dump proper, after it seized the tasks)."""
    images = list(checkpoint.glob("*.img"))
    assert images, f"no CRIU images in {checkpoint}: {sorted(p.name for p in checkpoint.iterdir())}"
    return min(p.stat().st_mtime for p in images)


def committed_metadata(agent: AgentProcess) -> tuple[Path, dict[str, Any]]:
    committed = agent.settled_checkpoints()
    assert len(committed) == 1, f"want one committed checkpoint, have {committed}"
    return committed[0], json.loads((committed[0] / "metadata.json").read_text())


def task_state(pid: int) -> str:
    """The init's run state letter, with "+traced" while a tracer (CRIU) has seized it."""
    try:
        fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":\t" in line)
    except OSError:
        return "gone"
    letter = fields.get("State", "?").split()[0]
    return letter + ("+traced" if fields.get("TracerPid", "0").strip() != "0" else "")


@dataclass
class FreezerWatcher:
    """Samples a cgroup's freezer.state and its init's run state every millisecond;
    keeps the transitions as (time, freezer state, task state)."""

    path: Path
    pid: int
    transitions: list[tuple[float, str, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, name="freezer-watcher", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        last = None
        while not self._stop.is_set():
            try:
                freezer = self.path.read_text().strip()
            except OSError:
                freezer = "GONE"
            sample = (freezer, task_state(self.pid))
            if sample != last:
                self.transitions.append((time.time(), *sample))
                last = sample
            time.sleep(0.001)

    def frozen_periods(self) -> list[tuple[float, float]]:
        """(first seen FROZEN, first seen not FROZEN) for every frozen stretch."""
        periods: list[tuple[float, float]] = []
        start = None
        for at, freezer, _ in self.transitions:
            if freezer == "FROZEN" and start is None:
                start = at
            elif freezer != "FROZEN" and start is not None:
                periods.append((start, at))
                start = None
        if start is not None:
            periods.append((start, float("inf")))
        return periods

    def during(self, begin: float, end: float) -> list[tuple[float, str, str]]:
        """The samples in force at any moment of [begin, end)."""
        before = [t for t in self.transitions if t[0] <= begin][-1:]
        return before + [t for t in self.transitions if begin < t[0] < end]

    def describe(self) -> str:
        return ", ".join(f"{at:.3f} {freezer}/{task}" for at, freezer, task in self.transitions)


class TaskStatusPoller:
    """`ctr task ls` in a loop: (call began, call ended, status) per sample."""

    def __init__(self, ctd: Containerd, container_id: str) -> None:
        self._ctd, self._id = ctd, container_id
        self.samples: list[tuple[float, float, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="task-ls", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.time()
            try:
                status = self._ctd.task_status(self._id)
            except Exception:  # noqa: BLE001 - a failed sample says nothing either way
                status = "no answer"
            self.samples.append((began, time.time(), status))


class Containers:
    """Busybox containers under the Kybernate runtime; all removed at the end."""

    def __init__(self, ctd: Containerd, agent: AgentProcess) -> None:
        self.ctd, self.agent = ctd, agent
        self.ids: list[str] = []
        self.images: list[str] = []

    def new_id(self) -> str:
        container_id = f"kyb-gpu-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.ids.append(container_id)
        return container_id

    def run(self, token: str, *, memory: int = CONTAINER_GPU_MEMORY, command: tuple[str, ...] = ("sleep", "1000000"),
            annotations: dict[str, str] | None = None) -> tuple[str, int]:
        """Start a detached CUDA container; returns (id, init pid)."""
        container_id = self.new_id()
        notes = {"io.kybernate.agent-socket": str(self.agent.socket), **(annotations or {})}
        args = ["run", "--runtime", KYBERNATE_RUNTIME, "-d", "--null-io",
                "--env", f"KYBERNATE_FAKE_CUDA={token}", "--env", f"KYBERNATE_FAKE_CUDA_MEM={memory}"]
        for key, value in notes.items():
            args += ["--annotation", f"{key}={value}"]
        self.ctd.ctr(*args, BUSYBOX_IMAGE_REF, container_id, *command, check=True)
        self.ctd.wait_task_status(container_id, "RUNNING")
        return container_id, task_pid(self.ctd, container_id)

    def checkpoint_image(self) -> str:
        ref = f"kybernate-test/ckpt-{os.getpid()}-{uuid.uuid4().hex[:8]}:latest"
        self.images.append(ref)
        return ref

    def discard(self, container_id: str) -> None:
        """Task and container gone (the checkpoint image stays)."""
        if self.ctd.task_status(container_id) is not None:
            self.ctd.ctr("task", "kill", "-s", "SIGKILL", "--all", container_id, timeout=30)
            self.ctd.ctr("task", "delete", "--force", container_id, timeout=30)
        self.ctd.ctr("containers", "rm", container_id, timeout=30)

    def remove_all(self) -> None:
        if not self.ctd.running:
            return
        for container_id in self.ids:
            with contextlib.suppress(Exception):
                self.discard(container_id)
        for ref in self.images:
            self.ctd.ctr("images", "rm", ref, timeout=30)

    def runc_knows(self, container_id: str) -> bool:
        result = subprocess.run(["runc", "--root", str(self.ctd.runc_root()), "state", container_id],
                                capture_output=True, text=True, timeout=30, check=False)
        return result.returncode == 0


def checkpointed_with_exit(containers: Containers, token: str) -> tuple[str, str]:
    """A CUDA container checkpointed with exit (`ctr container checkpoint --task`), its
    task and container removed; returns (container id to reuse, checkpoint image ref)."""
    ctd, agent = containers.ctd, containers.agent
    container_id, _ = containers.run(token, annotations={"io.kybernate.checkpoint.exit": "true"})
    ref = containers.checkpoint_image()
    ctd.ctr("container", "checkpoint", "--task", container_id, ref, timeout=120, check=True)
    ctd.wait_task_status(container_id, "STOPPED")
    record = fake_record(agent, token)
    assert record["state"] == "CHECKPOINTED", record
    assert record["host_memory"] == {GPU_A: CONTAINER_GPU_MEMORY}, record
    # The checkpoint released the GPU: its memory is free again.
    assert fake_gpus(agent)[GPU_A].memory_free == 80 * GIB
    ctd.ctr("task", "delete", container_id, timeout=30, check=True)
    ctd.ctr("containers", "rm", container_id, timeout=30, check=True)
    return container_id, ref


def assert_nothing_ran(containers: Containers, events: CtrEvents, container_id: str, token: str,
                       since: float) -> None:
    """A refused restore: no runc container, no restored process, no CUDA call, no start."""
    assert not containers.runc_knows(container_id), f"runc has a container {container_id}"
    assert live_pids_with_marker(token) == [], "a restored process is alive"
    assert cuda_calls(containers.agent, token, since) == [], "CUDA calls were made"
    assert events.of(container_id, "/tasks/start", since) == []
    assert containers.ctd.task_status(container_id) in (None, "CREATED", "STOPPED")


def restore_attempt(containers: Containers, container_id: str, ref: str) -> subprocess.CompletedProcess[str]:
    return containers.ctd.ctr("container", "restore", "--live", container_id, ref, timeout=120)


# -- 1 and 2: checkpoint order under containerd's pause, leave running ----------------


def test_checkpoint_locks_before_freeze_and_dumps_frozen_then_unlocks_after_resume(
        ctd: Containerd, node: AgentProcess, containers: Containers, events: CtrEvents) -> None:
    token = f"tok-{uuid.uuid4().hex[:8]}"
    container_id, pid = containers.run(token)
    ref = containers.checkpoint_image()

    with FreezerWatcher(freezer_state_path(pid), pid) as freezer:
        time.sleep(0.05)
        ctd.ctr("container", "checkpoint", "--task", container_id, ref, timeout=120, check=True)
        ctd.wait_task_status(container_id, "RUNNING")
        time.sleep(0.05)

    calls = cuda_calls(node, token)
    where = f"CUDA calls: {calls}\nfreezer: {freezer.describe()}"
    assert [c["action"] for c in calls] == ["lock", "checkpoint", "restore", "unlock"], where
    assert all(c["ok"] and not c["frozen"] and c["pid"] == pid for c in calls), where
    lock, gpu_checkpoint, gpu_restore, unlock = (c["wall"] for c in calls)

    frozen = freezer.frozen_periods()
    assert len(frozen) >= 2, where
    # Pause: the CUDA lock first, then the freeze.
    pause_freeze = frozen[0]
    assert lock < pause_freeze[0], where
    # Checkpoint thawed the paused container before the GPU checkpoint ...
    assert pause_freeze[1] < gpu_checkpoint, where
    # ... then froze it, and CRIU dumped it: from that freeze until the thaw before the
    # GPU restore the task was never free: frozen, or seized by CRIU (which thaws the
    # freezer once it holds every task with ptrace, and runs its parasite in them).
    checkpoint_dir, metadata = committed_metadata(node)
    dumped = dump_time(checkpoint_dir)
    dump_freeze = next((p for p in frozen if p[0] > gpu_checkpoint), None)
    assert dump_freeze is not None, where
    # Free again: thawed and no longer seized by CRIU (the agent's thaw after the dump).
    free_again = next((at for at, f, task in freezer.transitions
                       if at > dump_freeze[0] and f == "THAWED" and not task.endswith("+traced")), None)
    assert free_again is not None and free_again < gpu_restore, where
    assert dump_freeze[0] - FS_CLOCK_SLACK_S <= dumped <= free_again + FS_CLOCK_SLACK_S, \
        f"dump at {dumped:.3f}\n{where}"
    assert any(task.endswith("+traced") for _, _, task in freezer.during(dump_freeze[0], free_again)), \
        f"CRIU never seized the task between the freeze and the thaw\n{where}"
    # Resume: thaw first, then the unlock.
    assert frozen[-1][1] < unlock, where
    assert freezer.transitions[-1][1:] == ("THAWED", "S"), where

    timings = metadata["timings_ms"]
    reached = [phase for phase in PHASE_ORDER if phase in timings]
    assert reached == PHASE_ORDER, timings
    assert [timings[p] for p in PHASE_ORDER] == sorted(timings[p] for p in PHASE_ORDER), timings
    assert timings.get("resumed", -1) >= timings["dumped"], timings

    # metadata.json: each GPU's model, UUID and the memory the container held there.
    gpus = metadata["cuda"]["gpus"]
    assert [(g["uuid"], g["model"], g["memory_used_by_container"]) for g in gpus] == \
        [(GPU_A, MODEL, CONTAINER_GPU_MEMORY)], metadata["cuda"]

    # 2: leave running: GPU state restored and unlocked, memory back on the GPU.
    record = fake_record(node, token)
    assert record["state"] == "RUNNING", record
    assert record["device_memory"] == {GPU_A: CONTAINER_GPU_MEMORY}, record
    assert fake_gpus(node)[GPU_A].memory_free == 80 * GIB - CONTAINER_GPU_MEMORY
    assert task_pid(ctd, container_id) == pid
    assert freezer_state_path(pid).read_text().strip() == "THAWED"
    assert events.of(container_id, "/tasks/exit") == []


# -- 3: restore, then unlock, then RUNNING ---------------------------------------------


def test_restore_unlocks_gpu_before_task_reports_running(
        ctd: Containerd, node: AgentProcess, containers: Containers, events: CtrEvents) -> None:
    token = f"tok-{uuid.uuid4().hex[:8]}"
    container_id, ref = checkpointed_with_exit(containers, token)

    started = time.time()
    with TaskStatusPoller(ctd, container_id) as poller:
        result = restore_attempt(containers, container_id, ref)
        assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{ctd.log_tail()}"
        ctd.wait_task_status(container_id, "RUNNING")
    pid = task_pid(ctd, container_id)

    calls = cuda_calls(node, token, since=started)
    assert [c["action"] for c in calls] == ["restore", "unlock"], calls
    assert all(c["ok"] and not c["frozen"] and c["pid"] == pid for c in calls), calls
    unlocked = calls[-1]["wall"]

    start_time, start_event = events.wait_for(container_id, "/tasks/start", since=started, timeout=15.0)
    assert start_event.get("pid") == pid, start_event
    assert unlocked < start_time, f"unlock at {unlocked:.6f}, /tasks/start at {start_time:.6f}"
    running = [(began, ended) for began, ended, status in poller.samples if status == "RUNNING"]
    assert running, poller.samples
    # No `ctr task ls` that finished before the unlock saw RUNNING.
    assert running[0][1] > unlocked, (unlocked, poller.samples)

    record = fake_record(node, token)
    assert record["state"] == "RUNNING" and record["pid"] == pid, record
    assert record["device_memory"] == {GPU_A: CONTAINER_GPU_MEMORY}, record
    assert live_pids_with_marker(token) == [pid]


# -- 4: the GPUs a restore lands on ------------------------------------------------------


def test_restore_checks_model_and_memory_before_anything_runs_and_remaps_uuids(
        ctd: Containerd, node: AgentProcess, containers: Containers, events: CtrEvents) -> None:
    token = f"tok-{uuid.uuid4().hex[:8]}"
    container_id, ref = checkpointed_with_exit(containers, token)

    # A node with another model only.
    write_gpus(node, [(GPU_C, OTHER_MODEL, 80 * GIB)])
    attempt = time.time()
    result = restore_attempt(containers, container_id, ref)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert MODEL in output and GPU_A in output, output
    assert_nothing_ran(containers, events, container_id, token, attempt)
    containers.discard(container_id)

    # The right model, too little free memory.
    write_gpus(node, [(GPU_A, MODEL, 4 * GIB)])
    attempt = time.time()
    result = restore_attempt(containers, container_id, ref)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert (f"not enough GPU memory on GPU {GPU_A}: need {CONTAINER_GPU_MEMORY}, free {4 * GIB}"
            in output), output
    assert_nothing_ran(containers, events, container_id, token, attempt)
    containers.discard(container_id)

    # The same model under another UUID, with room: restored there.
    write_gpus(node, [(GPU_B, MODEL, 80 * GIB)])
    attempt = time.time()
    result = restore_attempt(containers, container_id, ref)
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{ctd.log_tail()}"
    ctd.wait_task_status(container_id, "RUNNING")
    pid = task_pid(ctd, container_id)
    calls = cuda_calls(node, token, attempt)
    assert [(c["action"], c["ok"]) for c in calls] == [("restore", True), ("unlock", True)], calls
    record = fake_record(node, token)
    assert record["state"] == "RUNNING" and record["pid"] == pid, record
    assert record["device_memory"] == {GPU_B: CONTAINER_GPU_MEMORY}, record
    assert fake_gpus(node)[GPU_B].memory_free == 80 * GIB - CONTAINER_GPU_MEMORY


# -- 5: failures ----------------------------------------------------------------------------


def test_lock_timeout_leaves_every_process_unlocked_thawed_and_running(
        ctd: Containerd, node: AgentProcess, containers: Containers) -> None:
    token, child_token = f"tok-{uuid.uuid4().hex[:8]}", f"tok-{uuid.uuid4().hex[:8]}"
    # Two CUDA processes: the init and a child with a token of its own.
    container_id, pid = containers.run(
        token, command=("sh", "-c", f"KYBERNATE_FAKE_CUDA={child_token} sleep 1000000 & exec sleep 1000000"),
        annotations={"io.kybernate.checkpoint.gpu-lock-timeout-ms": str(LOCK_TIMEOUT_MS)})
    (node.fake_dir / "hang-lock").write_text("")
    started = time.monotonic()
    result = ctd.ctr("task", "checkpoint", container_id, timeout=120)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr

    assert result.returncode != 0, output
    assert f"timed out after {LOCK_TIMEOUT_MS} ms" in output, output
    cuda_pids = live_pids_with_marker(token) + live_pids_with_marker(child_token)
    assert len(cuda_pids) == 2 and pid in cuda_pids, cuda_pids
    assert any(f"pid {p}" in output for p in cuda_pids), output
    assert elapsed < 30, f"the failed checkpoint took {elapsed:.1f}s"

    assert ctd.task_status(container_id) == "RUNNING"
    assert freezer_state_path(pid).read_text().strip() == "THAWED"
    for each in (token, child_token):
        record = fake_record(node, each)
        assert record["state"] == "RUNNING", record
        calls = cuda_calls(node, each)
        locks = [c for c in calls if c["action"] == "lock"]
        # A process whose lock went through before the other timed out is unlocked again.
        if any(c["ok"] for c in locks):
            assert calls[-1]["action"] == "unlock" and calls[-1]["ok"], calls
        assert not any(c["action"] == "checkpoint" for c in calls), calls
    assert any(not c["ok"] and "timeout" in (c["error"] or "")
               for c in node.fake_events("lock")), node.fake_events("lock")
    assert node.committed_checkpoints() == []


def test_failed_lock_of_one_process_unlocks_the_ones_already_locked(
        ctd: Containerd, node: AgentProcess, containers: Containers) -> None:
    token, child_token = f"tok-{uuid.uuid4().hex[:8]}", f"tok-{uuid.uuid4().hex[:8]}"
    container_id, pid = containers.run(
        token, command=("sh", "-c", f"KYBERNATE_FAKE_CUDA={child_token} sleep 1000000 & exec sleep 1000000"))
    # The next lock call fails, the other one goes through: it must be rolled back.
    FakeBackend(node.fake_dir).inject_failure("lock", "CUDA_ERROR_NOT_READY")
    result = ctd.ctr("task", "checkpoint", container_id, timeout=120)
    output = result.stdout + result.stderr

    assert result.returncode != 0, output
    assert "CUDA_ERROR_NOT_READY" in output, output
    locks = node.fake_events("lock")
    assert sorted(c["ok"] for c in locks) == [False, True], locks
    locked = next(c for c in locks if c["ok"])
    unlocks = [c for c in node.fake_events("unlock") if c["token"] == locked["token"]]
    assert [c["ok"] for c in unlocks] == [True], unlocks
    assert unlocks[0]["wall"] > locked["wall"]
    for each in (token, child_token):
        assert fake_record(node, each)["state"] == "RUNNING", fake_record(node, each)
    assert ctd.task_status(container_id) == "RUNNING"
    assert freezer_state_path(pid).read_text().strip() == "THAWED"
    assert not node.fake_events("checkpoint")


def test_agent_killed_while_gpu_locked_kills_container_and_reports_exit(
        ctd: Containerd, node: AgentProcess, containers: Containers, events: CtrEvents) -> None:
    node.stop()
    node.write_config(lock_timeout_ms=5000, hold_after_phase={"gpu_locked": 120})
    node.start()
    token = f"tok-{uuid.uuid4().hex[:8]}"
    container_id, pid = containers.run(token)

    checkpoint = subprocess.Popen(ctd.ctr_argv("task", "checkpoint", container_id), env=ctd.environment(),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while "holding" not in node.log():
            assert checkpoint.poll() is None, checkpoint.communicate()[0]
            assert time.monotonic() < deadline, f"the agent never reached gpu_locked:\n{node.log()}"
            time.sleep(0.05)
        assert fake_record(node, token)["state"] == "LOCKED"
        killed_at = time.time()
        node.stop(signal.SIGKILL)
        output, _ = checkpoint.communicate(timeout=60)
    finally:
        if checkpoint.poll() is None:
            checkpoint.kill()
            checkpoint.wait()

    assert checkpoint.returncode != 0, output
    assert "killed" in output, output
    _, exit_event = events.wait_for(container_id, "/tasks/exit", since=killed_at, timeout=30)
    assert exit_event.get("pid") == pid and exit_event.get("exit_status") == 137, exit_event
    ctd.wait_task_status(container_id, "STOPPED")
    assert live_pids_with_marker(token) == []
    assert node.committed_checkpoints() == []

    # The next agent start marks the staging directory failed and removes it.
    staging = [p.name for p in node.local_tier.iterdir() if p.name.startswith(".staging-")]
    assert len(staging) == 1, staging
    node.stop()
    node.write_config(lock_timeout_ms=5000)
    node.start()
    leftovers = [p.name for p in node.local_tier.iterdir()] if node.local_tier.exists() else []
    assert not [name for name in leftovers if name.startswith(".staging-")], leftovers
    assert node.committed_checkpoints() == []
