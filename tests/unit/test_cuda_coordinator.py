"""CudaCoordinator over FakeBackend, with real processes and real v1 freezer cgroups."""

# The fixtures come from test_cuda_fake.py; pytest passes them by parameter name.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from kybernate.cuda import CudaCoordinator, CudaError, CudaLockTimeout, CudaState, GpuInfo
from kybernate.cuda.coordinator import plan_gpu_placement, report_to_json
from kybernate.cuda.fake import FakeBackend
from kybernate.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

from tests.unit.test_cuda_fake import (  # noqa: F401  (fixtures)
    GIB,
    GPU_A,
    GPU_B,
    GPU_C,
    MIB,
    FreezerCgroup,
    Spawn,
    backend,
    fake_dir,
    free_memory,
    freezer,
    spawn,
    write_gpus,
)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_checkpoint_cycle_in_kybernate_order(
        backend: FakeBackend, spawn: Spawn, freezer: Callable[[], FreezerCgroup]) -> None:
    """lock all -> checkpoint all -> freeze -> (dump) -> thaw -> restore all -> unlock all."""
    group = freezer()
    procs = [spawn(memory=(i + 1) * GIB) for i in range(3)]
    pids = [p.pid for p in procs]
    for pid in pids:
        group.add(pid)
    coordinator = CudaCoordinator(backend)

    async def pipeline() -> tuple[dict, dict, dict, dict, dict, int, int]:
        locked = await coordinator.lock_all(pids, 2000)
        inventory = await coordinator.snapshot_inventory(pids)
        checkpointed = await coordinator.checkpoint_all(pids)
        frozen_at = time.monotonic_ns()
        group.freeze()
        await asyncio.sleep(0.05)  # CRIU would dump here
        group.thaw()
        thawed_at = time.monotonic_ns()
        restored = await coordinator.restore_all(pids)
        unlocked = await coordinator.unlock_all(pids)
        return locked, inventory, checkpointed, restored, unlocked, frozen_at, thawed_at

    locked, inventory, checkpointed, restored, unlocked, frozen_at, thawed_at = run(pipeline())

    gpu = backend.gpus()[0]
    for report, action in ((locked, "lock"), (checkpointed, "checkpoint"),
                           (restored, "restore"), (unlocked, "unlock")):
        assert list(report) == pids
        assert all(step.action == action and not step.skipped and step.seconds >= 0
                   for step in report.values())
    assert checkpointed[pids[2]].gpu_memory == {gpu.uuid: 3 * GIB}
    assert report_to_json(checkpointed)["gpu_memory_bytes"] == 6 * GIB
    assert report_to_json(restored)["gpu_memory_bytes"] == 6 * GIB
    assert inventory["gpus"] == [{
        "index": 0, "uuid": gpu.uuid, "model": "Fake H100",
        "memory_total": 80 * GIB, "memory_used_by_container": 6 * GIB,
    }]
    assert all(backend.get_state(pid) is CudaState.RUNNING for pid in pids)

    events = backend.events()
    assert all(e["ok"] and not e["frozen"] for e in events)
    times = {action: [e["monotonic_ns"] for e in events if e["action"] == action]
             for action in ("lock", "checkpoint", "restore", "unlock")}
    assert all(len(stamps) == 3 for stamps in times.values())
    # Every process is locked before any is checkpointed; the GPU is quiet before the freeze.
    assert max(times["lock"]) < min(times["checkpoint"])
    assert max(times["checkpoint"]) < frozen_at
    assert thawed_at < min(times["restore"])
    assert max(times["restore"]) < min(times["unlock"])


def test_lock_timeout_on_a_frozen_process_unlocks_the_others(
        backend: FakeBackend, spawn: Spawn, freezer: Callable[[], FreezerCgroup]) -> None:
    free, stuck = spawn(), spawn()
    another = spawn()
    group = freezer()
    group.add(stuck.pid)
    backend.get_state(stuck.pid)
    group.freeze()
    pids = [free.pid, stuck.pid, another.pid]

    with pytest.raises(CudaLockTimeout) as err:
        run(CudaCoordinator(backend).lock_all(pids, 300))
    assert err.value.pid == stuck.pid
    assert f"pid {stuck.pid}" in str(err.value) and "300 ms" in str(err.value)
    group.thaw()
    assert [backend.get_state(pid) for pid in pids] == [CudaState.RUNNING] * 3
    unlocks = {e["pid"] for e in backend.events() if e["action"] == "unlock" and e["ok"]}
    assert unlocks == {free.pid, another.pid}


def test_injected_lock_failure_rolls_back(backend: FakeBackend, spawn: Spawn) -> None:
    pids = [spawn().pid for _ in range(3)]
    backend.inject_failure("lock", "CUDA_ERROR_INVALID_VALUE")
    with pytest.raises(CudaError, match="CUDA_ERROR_INVALID_VALUE") as err:
        run(CudaCoordinator(backend).lock_all(pids, 1000))
    assert err.value.pid in pids
    assert all(backend.get_state(pid) is CudaState.RUNNING for pid in pids)


def test_steps_skip_processes_already_in_the_target_state(
        backend: FakeBackend, spawn: Spawn) -> None:
    a, b = spawn().pid, spawn().pid
    coordinator = CudaCoordinator(backend)
    backend.lock(a, 1000)  # Pause took this lock already

    locked = run(coordinator.lock_all([a, b], 1000))
    assert locked[a].skipped and not locked[b].skipped
    assert len([e for e in backend.events() if e["action"] == "lock"]) == 2

    run(coordinator.checkpoint_all([a, b]))
    backend.restore(a)  # restored already, as a CRIU CUDA plugin does
    restored = run(coordinator.restore_all([a, b]))
    assert restored[a].skipped and restored[a].before is CudaState.LOCKED
    assert not restored[b].skipped
    restores = [e for e in backend.events() if e["action"] == "restore"]
    assert sorted(e["pid"] for e in restores) == sorted([a, b])
    assert all(e["ok"] for e in restores)  # never a second, failing restore

    run(coordinator.unlock_all([a, b]))
    unlocked = run(coordinator.unlock_all([a, b]))
    assert all(step.skipped for step in unlocked.values())


def test_steps_refuse_processes_in_the_wrong_state(backend: FakeBackend, spawn: Spawn) -> None:
    a, b = spawn().pid, spawn().pid
    coordinator = CudaCoordinator(backend)
    with pytest.raises(FailedPrecondition, match=f"checkpoint CUDA process {a}: it is RUNNING"):
        run(coordinator.checkpoint_all([a]))
    run(coordinator.lock_all([a, b], 1000))
    run(coordinator.checkpoint_all([a]))
    with pytest.raises(FailedPrecondition, match=f"lock CUDA process {a}: it is CHECKPOINTED"):
        run(coordinator.lock_all([a, b], 1000))
    with pytest.raises(FailedPrecondition, match=rf"unlock CUDA processes \[{a}\]"):
        run(coordinator.unlock_all([a, b]))
    assert backend.get_state(b) is CudaState.RUNNING  # the rest were still unlocked
    assert backend.get_state(a) is CudaState.CHECKPOINTED


def test_restore_all_with_too_little_memory_names_the_pid(
        backend: FakeBackend, spawn: Spawn) -> None:
    write_gpus(backend, (GPU_A, "Fake H100", GIB))
    pid = spawn(memory=700 * MIB).pid
    coordinator = CudaCoordinator(backend)
    run(coordinator.lock_all([pid], 1000))
    run(coordinator.checkpoint_all([pid]))
    hog = spawn(memory=512 * MIB)
    backend.is_cuda_process(hog.pid)
    with pytest.raises(CudaError) as err:
        run(coordinator.restore_all([pid]))
    assert err.value.pid == pid
    assert f"not enough GPU memory on GPU {GPU_A}: need {700 * MIB}, free {512 * MIB}" in str(
        err.value)
    with pytest.raises(ResourceExhausted, match=f"not enough GPU memory on GPU {GPU_A}"):
        coordinator.check_restore_fit({GPU_A: 700 * MIB}, {GPU_A: "Fake H100"})


def test_restore_onto_another_gpu_through_the_planned_map(
        backend: FakeBackend, spawn: Spawn) -> None:
    write_gpus(backend, (GPU_A, "Fake H100", 8 * GIB), (GPU_B, "Fake H100", 8 * GIB))
    pid = spawn(memory=5 * GIB, gpu=GPU_A).pid
    coordinator = CudaCoordinator(backend)
    run(coordinator.lock_all([pid], 1000))
    # The process sees both GPUs: the checkpoint covers both, memory on one.
    inventory = run(coordinator.snapshot_inventory([pid]))
    required = {g["uuid"]: g["memory_used_by_container"] for g in inventory["gpus"]}
    models = {g["uuid"]: g["model"] for g in inventory["gpus"]}
    assert required == {GPU_A: 5 * GIB, GPU_B: 0}
    run(coordinator.checkpoint_all([pid]))
    assert coordinator.check_restore_fit(required, models) == {}  # nothing has to move
    hog = spawn(memory=4 * GIB, gpu=GPU_A)
    backend.is_cuda_process(hog.pid)

    plan = coordinator.check_restore_fit(required, models)
    assert plan == {GPU_A: GPU_B, GPU_B: GPU_A}  # the empty GPU takes the crowded one's place
    restored = run(coordinator.restore_all([pid], plan))
    assert restored[pid].gpu_memory == {GPU_B: 5 * GIB}
    run(coordinator.unlock_all([pid]))
    assert free_memory(backend, GPU_B) == 3 * GIB


def test_an_incomplete_map_is_refused_as_the_driver_would(
        backend: FakeBackend, spawn: Spawn) -> None:
    write_gpus(backend, (GPU_A, "Fake H100", 8 * GIB), (GPU_B, "Fake H100", 8 * GIB))
    pid = spawn(memory=GIB, gpu=GPU_A).pid
    coordinator = CudaCoordinator(backend)
    run(coordinator.lock_all([pid], 1000))
    run(coordinator.checkpoint_all([pid]))
    with pytest.raises(CudaError, match="must name every checkpointed GPU") as err:
        run(coordinator.restore_all([pid], {GPU_A: GPU_B}))
    assert err.value.pid == pid and err.value.error_name == "CUDA_ERROR_INVALID_VALUE"
    assert backend.get_state(pid) is CudaState.CHECKPOINTED


def gpu(index: int, uuid: str, model: str, free: int) -> GpuInfo:
    return GpuInfo(index, uuid, model, 80 * GIB, free)


def test_placement_keeps_uuids_that_fit_and_never_shares_a_target() -> None:
    gpus = [gpu(0, GPU_A, "H100", 10 * GIB), gpu(1, GPU_B, "H100", 50 * GIB),
            gpu(2, GPU_C, "H200", 70 * GIB)]
    assert plan_gpu_placement({GPU_A: 8 * GIB}, {GPU_A: "H100"}, gpus) == {GPU_A: GPU_A}
    old1, old2 = "GPU-11111111-0000-4000-8000-000000000000", "GPU-22222222-0000-4000-8000-0000"
    plan = plan_gpu_placement({old1: 9 * GIB, old2: 30 * GIB},
                              {old1: "H100", old2: "H100"}, gpus)
    assert plan == {old2: GPU_B, old1: GPU_A}
    with pytest.raises(ResourceExhausted, match=f"not enough GPU memory on GPU {GPU_B}: "
                                                f"need {60 * GIB}, free {50 * GIB}"):
        plan_gpu_placement({old1: 60 * GIB}, {old1: "H100"}, gpus)
    with pytest.raises(FailedPrecondition, match="no A100 GPU on this node"):
        plan_gpu_placement({old1: GIB}, {old1: "A100"}, gpus)
    with pytest.raises(ResourceExhausted, match="already taken"):
        plan_gpu_placement({old1: GIB, old2: GIB, GPU_A: GIB}, dict.fromkeys(
            [old1, old2, GPU_A], "H100"), gpus)
    with pytest.raises(InvalidArgument, match="no GPU model"):
        plan_gpu_placement({old1: GIB}, {}, gpus)


def test_placement_moves_a_fitting_gpu_only_when_another_needs_its_place() -> None:
    gpus = [gpu(0, GPU_A, "H100", 4 * GIB), gpu(1, GPU_B, "H100", 70 * GIB)]
    # Both checkpointed GPUs are here; A's 8 GiB no longer fit on A, B's nothing does.
    assert plan_gpu_placement({GPU_A: 8 * GIB, GPU_B: 0}, dict.fromkeys([GPU_A, GPU_B], "H100"),
                              gpus) == {GPU_A: GPU_B, GPU_B: GPU_A}
    # Everything fits in place: the identity, which the caller turns into no map.
    assert plan_gpu_placement({GPU_A: GIB, GPU_B: 0}, dict.fromkeys([GPU_A, GPU_B], "H100"),
                              gpus) == {GPU_A: GPU_A, GPU_B: GPU_B}
    # One checkpointed GPU is absent: it moves, the present one stays.
    gone = "GPU-99999999-0000-4000-8000-000000000000"
    assert plan_gpu_placement({gone: GIB, GPU_B: 0}, dict.fromkeys([gone, GPU_B], "H100"),
                              gpus) == {gone: GPU_A, GPU_B: GPU_B}


def test_inventory_falls_back_to_memory_when_a_backend_cannot_name_the_gpus(
        backend: FakeBackend, spawn: Spawn) -> None:
    class Blind(FakeBackend):
        def process_gpus(self, pid: int) -> set[str]:
            raise CudaError("nvidia-smi failed", pid=pid)

    write_gpus(backend, (GPU_A, "Fake H100", 8 * GIB), (GPU_B, "Fake H100", 8 * GIB))
    pid = spawn(memory=GIB, gpu=GPU_A).pid
    blind = Blind(backend.state_dir)
    inventory = run(CudaCoordinator(blind).snapshot_inventory([pid]))
    assert [(g["uuid"], g["memory_used_by_container"]) for g in inventory["gpus"]] == [(GPU_A, GIB)]
    # Where the backend can tell, both GPUs the process sees are recorded.
    inventory = run(CudaCoordinator(backend).snapshot_inventory([pid]))
    assert [(g["uuid"], g["memory_used_by_container"]) for g in inventory["gpus"]] == \
        [(GPU_A, GIB), (GPU_B, 0)]
