"""FakeBackend with real processes in real v1 freezer cgroups.

The fixtures here are shared with test_cuda_coordinator.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kybernate.cuda import (
    CudaError,
    CudaLockTimeout,
    CudaState,
    NoGpuBackend,
    find_cuda_pids,
    load_backend,
)
from kybernate.cuda.fake import DEFAULT_PROCESS_MEMORY, ENV_STATE_DIR, FakeBackend
from kybernate.errors import DeadlineExceeded, InvalidArgument

FREEZER_ROOT = Path("/sys/fs/cgroup/freezer")
GIB = 1 << 30
MIB = 1 << 20
GPU_A = "GPU-aaaaaaaa-0000-4000-8000-000000000001"
GPU_B = "GPU-bbbbbbbb-0000-4000-8000-000000000002"
GPU_C = "GPU-cccccccc-0000-4000-8000-000000000003"

Spawn = Callable[..., subprocess.Popen[bytes]]


class FreezerCgroup:
    """A v1 freezer cgroup of our own, frozen and thawed the way runc does it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def state(self) -> str:
        return (self.path / "freezer.state").read_text().strip()

    def _set(self, wanted: str) -> None:
        deadline = time.monotonic() + 10
        while self.state() != wanted:
            (self.path / "freezer.state").write_text(wanted)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.path} stuck in {self.state()}, wanted {wanted}")
            time.sleep(0.01)

    def freeze(self) -> None:
        self._set("FROZEN")

    def thaw(self) -> None:
        self._set("THAWED")


@pytest.fixture
def fake_dir(tmp_path: Path) -> Path:
    return tmp_path / "fake-cuda"


@pytest.fixture
def backend(fake_dir: Path) -> FakeBackend:
    return FakeBackend(fake_dir, poll_interval=0.005)


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start sleeping python processes, marked as fake CUDA processes unless token=None."""
    started: list[subprocess.Popen[bytes]] = []

    def start(token: str | None = "auto", *, memory: int | None = None,
              gpu: str | None = None, visible: list[str] | None = None
              ) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KYBERNATE_FAKE_CUDA")}
        if token is not None:
            env["KYBERNATE_FAKE_CUDA"] = (
                f"t{os.getpid()}-{uuid.uuid4().hex[:12]}" if token == "auto" else token)
        if memory is not None:
            env["KYBERNATE_FAKE_CUDA_MEM"] = str(memory)
        if gpu is not None:
            env["KYBERNATE_FAKE_CUDA_GPU"] = gpu
        if visible is not None:
            env["KYBERNATE_FAKE_CUDA_VISIBLE"] = ",".join(visible)
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def freezer() -> Iterator[Callable[[], FreezerCgroup]]:
    """Make uniquely named v1 freezer cgroups; thawed, emptied and removed afterwards."""
    made: list[FreezerCgroup] = []

    def make() -> FreezerCgroup:
        path = FREEZER_ROOT / f"kyb-cuda-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path.mkdir()
        group = FreezerCgroup(path)
        made.append(group)
        return group

    try:
        yield make
    finally:
        for group in made:
            try:
                group.thaw()
                for pid in (group.path / "cgroup.procs").read_text().split():
                    os.kill(int(pid), signal.SIGKILL)
                deadline = time.monotonic() + 10
                while (group.path / "cgroup.procs").read_text().strip():
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.01)
            finally:
                group.path.rmdir()


def write_gpus(backend: FakeBackend, *gpus: tuple[str, str, int]) -> None:
    backend.write_gpus([{"uuid": u, "model": m, "memory_total": t} for u, m, t in gpus])


def free_memory(backend: FakeBackend, gpu_uuid: str) -> int:
    return next(g.memory_free for g in backend.gpus() if g.uuid == gpu_uuid)


# -- state machine ------------------------------------------------------------------------


def test_full_cycle_moves_memory_to_host_and_back(backend: FakeBackend, spawn: Spawn) -> None:
    proc = spawn(memory=3 * GIB)
    pid = proc.pid
    [gpu] = backend.gpus()
    assert gpu.model == "Fake H100" and gpu.memory_total == 80 * GIB

    assert backend.is_cuda_process(pid)
    assert backend.get_state(pid) is CudaState.RUNNING
    assert backend.process_gpu_memory(pid) == {gpu.uuid: 3 * GIB}
    assert free_memory(backend, gpu.uuid) == 77 * GIB

    backend.lock(pid, 1000)
    assert backend.get_state(pid) is CudaState.LOCKED
    backend.checkpoint(pid)
    assert backend.get_state(pid) is CudaState.CHECKPOINTED
    assert backend.process_gpu_memory(pid) == {}
    assert free_memory(backend, gpu.uuid) == 80 * GIB
    backend.restore(pid)
    assert backend.get_state(pid) is CudaState.LOCKED
    assert backend.process_gpu_memory(pid) == {gpu.uuid: 3 * GIB}
    backend.unlock(pid)
    assert backend.get_state(pid) is CudaState.RUNNING
    assert backend.restore_thread_id(pid) == pid  # a single-threaded process

    events = [e for e in backend.events() if e["action"] != "get-state"]
    assert [(e["action"], e["before"], e["after"]) for e in events] == [
        ("lock", "RUNNING", "LOCKED"),
        ("checkpoint", "LOCKED", "CHECKPOINTED"),
        ("restore", "CHECKPOINTED", "LOCKED"),
        ("unlock", "LOCKED", "RUNNING"),
    ]
    assert all(e["pid"] == pid and not e["frozen"] for e in events)
    stamps = [e["monotonic_ns"] for e in events]
    assert stamps == sorted(stamps)


def test_default_memory_and_unmarked_processes(backend: FakeBackend, spawn: Spawn) -> None:
    marked, plain = spawn(), spawn(token=None)
    assert backend.process_gpu_memory(marked.pid) == {backend.gpus()[0].uuid:
                                                      DEFAULT_PROCESS_MEMORY}
    assert not backend.is_cuda_process(plain.pid)
    with pytest.raises(CudaError, match=f"not a CUDA process.*pid {plain.pid}"):
        backend.lock(plain.pid, 100)
    assert find_cuda_pids([plain.pid, marked.pid, marked.pid], backend) == [marked.pid]


def test_illegal_transitions_fail_and_change_nothing(backend: FakeBackend, spawn: Spawn) -> None:
    pid = spawn().pid
    with pytest.raises(CudaError, match="checkpoint needs a LOCKED process, it is RUNNING") as err:
        backend.checkpoint(pid)
    assert err.value.error_name == "CUDA_ERROR_ILLEGAL_STATE" and err.value.pid == pid
    with pytest.raises(CudaError, match="unlock needs a LOCKED"):
        backend.unlock(pid)
    backend.lock(pid, 0)
    with pytest.raises(CudaError, match="lock needs a RUNNING process, it is LOCKED"):
        backend.lock(pid, 100)
    with pytest.raises(CudaError, match="restore needs a CHECKPOINTED"):
        backend.restore(pid)
    assert backend.get_state(pid) is CudaState.LOCKED
    with pytest.raises(InvalidArgument):
        backend.lock(pid, -1)


# -- the frozen-cgroup pitfall --------------------------------------------------------------


def test_lock_of_frozen_process_times_out_and_leaves_it_running(
        backend: FakeBackend, spawn: Spawn, freezer: Callable[[], FreezerCgroup]) -> None:
    proc = spawn()
    group = freezer()
    group.add(proc.pid)
    backend.get_state(proc.pid)  # known to the driver before the freeze
    group.freeze()

    started = time.monotonic()
    with pytest.raises(CudaLockTimeout) as err:
        backend.lock(proc.pid, 300)
    waited = time.monotonic() - started
    assert waited >= 0.3
    assert isinstance(err.value, DeadlineExceeded)
    assert f"pid {proc.pid}" in str(err.value) and "300 ms" in str(err.value)
    assert backend.get_state(proc.pid) is CudaState.RUNNING
    last = [e for e in backend.events() if e["action"] == "lock"][-1]
    assert (last["ok"], last["frozen"], last["freezer"]) == (False, True, "FROZEN")
    assert "timeout" in last["error"]

    # Every other call on a frozen process would block in the real driver: refused here.
    group.thaw()
    backend.lock(proc.pid, 300)
    group.freeze()
    with pytest.raises(CudaError, match="frozen"):
        backend.checkpoint(proc.pid)
    group.thaw()
    backend.checkpoint(proc.pid)
    assert backend.get_state(proc.pid) is CudaState.CHECKPOINTED


def test_lock_succeeds_when_the_cgroup_thaws_within_the_timeout(
        backend: FakeBackend, spawn: Spawn, freezer: Callable[[], FreezerCgroup]) -> None:
    proc = spawn()
    group = freezer()
    group.add(proc.pid)
    group.freeze()
    thawer = threading.Timer(0.3, group.thaw)
    thawer.start()
    try:
        started = time.monotonic()
        backend.lock(proc.pid, 5000)
        assert 0.25 <= time.monotonic() - started < 5
    finally:
        thawer.join()
    assert backend.get_state(proc.pid) is CudaState.LOCKED


# -- failure injection ------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["lock", "checkpoint", "restore", "unlock"])
def test_injected_failure_hits_the_next_call_only(
        backend: FakeBackend, spawn: Spawn, action: str) -> None:
    pid = spawn().pid
    steps = {
        "lock": lambda: backend.lock(pid, 1000),
        "checkpoint": lambda: backend.checkpoint(pid),
        "restore": lambda: backend.restore(pid),
        "unlock": lambda: backend.unlock(pid),
    }
    order = ["lock", "checkpoint", "restore", "unlock"]
    for earlier in order[: order.index(action)]:
        steps[earlier]()
    state_before = backend.get_state(pid)
    backend.inject_failure(action, "CUDA_ERROR_LAUNCH_FAILED")
    with pytest.raises(CudaError, match="CUDA_ERROR_LAUNCH_FAILED") as err:
        steps[action]()
    assert err.value.pid == pid
    assert backend.get_state(pid) is state_before
    steps[action]()  # consumed: the next call works
    assert backend.get_state(pid) is not state_before


def test_hang_lock_file_makes_lock_wait_out_its_timeout(
        backend: FakeBackend, spawn: Spawn, fake_dir: Path) -> None:
    pid = spawn().pid
    (fake_dir / "hang-lock").touch()
    started = time.monotonic()
    with pytest.raises(CudaLockTimeout, match=f"pid {pid}.*200 ms.*injected hang"):
        backend.lock(pid, 200)
    assert time.monotonic() - started >= 0.2
    assert backend.get_state(pid) is CudaState.RUNNING
    assert not (fake_dir / "hang-lock").exists()
    backend.lock(pid, 200)


# -- memory and GPU remapping ----------------------------------------------------------------


def test_restore_needs_free_memory_on_the_target_gpu(backend: FakeBackend, spawn: Spawn) -> None:
    write_gpus(backend, (GPU_A, "Fake H100", GIB))
    first = spawn(memory=600 * MIB)
    backend.lock(first.pid, 1000)
    backend.checkpoint(first.pid)
    assert free_memory(backend, GPU_A) == GIB

    second = spawn(memory=600 * MIB)
    assert backend.is_cuda_process(second.pid)  # now holds 600 MiB of the GPU
    with pytest.raises(CudaError) as err:
        backend.restore(first.pid)
    assert (f"not enough GPU memory on GPU {GPU_A}: need {600 * MIB}, free {424 * MIB}"
            in str(err.value))
    assert err.value.error_name == "CUDA_ERROR_OUT_OF_MEMORY"
    assert backend.get_state(first.pid) is CudaState.CHECKPOINTED

    second.kill()
    second.wait()
    backend.restore(first.pid)  # the exited process's memory went back to the GPU
    assert backend.process_gpu_memory(first.pid) == {GPU_A: 600 * MIB}


def test_restore_follows_the_drivers_rules_for_gpu_pairs(
        backend: FakeBackend, spawn: Spawn) -> None:
    write_gpus(backend, (GPU_A, "Fake H100", 4 * GIB), (GPU_B, "Fake H100", 4 * GIB),
               (GPU_C, "Fake A100", 4 * GIB))
    pid = spawn(memory=GIB, gpu=GPU_A).pid
    # It sees every GPU, so its checkpoint covers all three, memory there or not.
    assert backend.process_gpus(pid) == {GPU_A, GPU_B, GPU_C}
    backend.lock(pid, 1000)
    backend.checkpoint(pid)
    assert backend.process_gpus(pid) == set()  # device files closed, as the driver's are

    with pytest.raises(CudaError, match="must name every checkpointed GPU") as err:
        backend.restore(pid, {GPU_A: GPU_B})  # only the GPU with memory
    assert err.value.error_name == "CUDA_ERROR_INVALID_VALUE"
    with pytest.raises(CudaError, match=f"GPU {GPU_C} for checkpointed GPU {GPU_A} "
                                        r"\(Fake H100\) is a Fake A100") as err:
        backend.restore(pid, {GPU_A: GPU_C, GPU_B: GPU_B, GPU_C: GPU_A})
    assert err.value.error_name == "CUDA_ERROR_INVALID_VALUE"
    with pytest.raises(InvalidArgument, match="two GPUs onto one"):
        backend.restore(pid, {GPU_A: GPU_B, GPU_B: GPU_B, GPU_C: GPU_C})
    assert backend.get_state(pid) is CudaState.CHECKPOINTED

    backend.restore(pid, {GPU_A: GPU_B, GPU_B: GPU_A, GPU_C: GPU_C})  # a swap
    assert backend.process_gpu_memory(pid) == {GPU_B: GIB}
    assert backend.process_gpus(pid) == {GPU_A, GPU_B, GPU_C}
    assert free_memory(backend, GPU_A) == 4 * GIB
    assert free_memory(backend, GPU_B) == 3 * GIB


def test_restore_without_a_map_needs_every_gpu_in_place(
        backend: FakeBackend, spawn: Spawn) -> None:
    write_gpus(backend, (GPU_A, "Fake H100", 4 * GIB), (GPU_B, "Fake H100", 4 * GIB))
    pid = spawn(memory=GIB, gpu=GPU_A, visible=[GPU_A]).pid
    assert backend.process_gpus(pid) == {GPU_A}
    backend.lock(pid, 1000)
    backend.checkpoint(pid)
    write_gpus(backend, (GPU_B, "Fake H100", 4 * GIB))  # GPU_A is gone
    for no_map in (None, {}, {GPU_A: GPU_A}):
        with pytest.raises(CudaError, match=f"GPU {GPU_A} is not present") as err:
            backend.restore(pid, no_map)
        assert err.value.error_name == "CUDA_ERROR_INVALID_DEVICE"
    backend.restore(pid, {GPU_A: GPU_B})
    assert backend.process_gpu_memory(pid) == {GPU_B: GIB}
    assert backend.process_gpus(pid) == {GPU_B}


# -- shared across processes and across a pid change -----------------------------------------


def test_state_is_shared_across_processes_and_survives_a_pid_change(
        fake_dir: Path, spawn: Spawn) -> None:
    token = f"shared-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    original = spawn(token=token, memory=GIB)
    driver_side = (
        "import sys; from kybernate.cuda.fake import FakeBackend\n"
        "b = FakeBackend(sys.argv[1]); pid = int(sys.argv[2])\n"
        "b.lock(pid, 1000); b.checkpoint(pid); print(b.get_state(pid).name)\n"
    )
    out = subprocess.run([sys.executable, "-c", driver_side, str(fake_dir), str(original.pid)],
                         capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "CHECKPOINTED"

    observer = FakeBackend(fake_dir)
    assert observer.get_state(original.pid) is CudaState.CHECKPOINTED
    record = json.loads((fake_dir / "processes" / f"{token}.json").read_text())
    assert record["state"] == "CHECKPOINTED" and record["host_memory"]

    # What a CRIU restore looks like to the driver: same environment, new pid.
    original.kill()
    original.wait()
    restored = spawn(token=token, memory=GIB)
    fresh = FakeBackend(fake_dir)
    assert fresh.get_state(restored.pid) is CudaState.CHECKPOINTED
    fresh.restore(restored.pid)
    fresh.unlock(restored.pid)
    assert fresh.get_state(restored.pid) is CudaState.RUNNING
    assert {e["pid"] for e in fresh.events()} == {original.pid, restored.pid}


def test_state_dir_comes_from_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spawn: Spawn) -> None:
    chosen = tmp_path / "from-env"
    monkeypatch.setenv(ENV_STATE_DIR, str(chosen))
    backend = load_backend("fake")
    assert isinstance(backend, FakeBackend) and backend.state_dir == chosen
    backend.lock(spawn().pid, 100)
    assert len(list((chosen / "processes").glob("*.json"))) == 1


def test_load_backend_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(load_backend("fake", fake_dir=str(tmp_path)), FakeBackend)
    with pytest.raises(InvalidArgument, match="unknown CUDA backend 'gpu'"):
        load_backend("gpu")
    # Without cuda-bindings and without cuda-checkpoint on PATH, auto finds no GPU.
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setenv("PATH", str(tmp_path))
    auto = load_backend("auto")
    assert isinstance(auto, NoGpuBackend)
    assert not auto.is_cuda_process(os.getpid()) and auto.gpus() == []
    with pytest.raises(CudaError, match="no CUDA driver"):
        auto.lock(os.getpid(), 10)


class _NvmlListingBackend(FakeBackend):
    """The fake, plus an NVML-style compute process list, as DriverApiBackend has."""

    def __init__(self, state_dir: Path, listed: set[int]) -> None:
        super().__init__(state_dir)
        self.listed = listed
        self.asked: list[int] = []

    def compute_pids(self) -> set[int]:
        return self.listed

    def is_cuda_process(self, pid: int) -> bool:
        self.asked.append(pid)
        return super().is_cuda_process(pid)


def test_discovery_asks_the_backend_for_pids_nvml_does_not_confirm(
        fake_dir: Path, spawn: Spawn) -> None:
    cuda, plain = spawn().pid, spawn(token=None).pid
    # Listed by NVML but holding no /dev/nvidia* file: not confirmed, so the backend decides.
    backend = _NvmlListingBackend(fake_dir, {plain})
    assert find_cuda_pids([plain, cuda], backend) == [cuda]
    assert backend.asked == [plain, cuda]
