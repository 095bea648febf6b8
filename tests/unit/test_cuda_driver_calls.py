"""DriverApiBackend against the real cuda-bindings (13.x from the venv, and 12.9 from
.venv/cuda-bindings-12.9; both installed by .ci/setup).

Everything that needs no driver runs here against the installed package: CUuuid and
CUcheckpointRestoreArgs built the way the package allows, read back from the memory
the driver would be handed, the version checks, CUresult names. The driver calls
themselves run in child interpreters against tests/support/fake_libcuda.c, a stand-in
libcuda.so.1 that receives the package's own structs through the C ABI and refuses a
restore's GPU pairs as NVIDIA's documentation says the driver does.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import pytest
from kybernate.cuda import CudaState
from kybernate.cuda.driver import (
    DriverApiBackend,
    DriverSupport,
    check_support,
    cu_uuid,
    error_name,
    restore_args,
)
from kybernate.errors import FailedPrecondition, InvalidArgument, Unimplemented

from tests.support.fake_libcuda import BINDINGS_12, FakeDriver, outcome, real_bindings, run_scenario

GPU_A = "GPU-aaaaaaaa-0000-4000-8000-000000000001"
GPU_B = "GPU-bbbbbbbb-0000-4000-8000-000000000002"
GPU_C = "GPU-cccccccc-0000-4000-8000-000000000003"
GPU_D = "GPU-dddddddd-0000-4000-8000-000000000004"


def raw(uuid: str) -> str:
    return uuid[4:].replace("-", "")


@pytest.fixture(scope="module")
def driver() -> Any:
    return real_bindings()


@pytest.fixture(scope="module")
def support(driver: Any) -> DriverSupport:
    import cuda.bindings

    return check_support(driver, cuda.bindings.__version__, 13000)


def restore_memory(args: Any) -> tuple[int, list[tuple[str, str]], bytes]:
    """What cuCheckpointProcessRestore would read through its pointer: the count, the
    pairs behind gpuPairs, and the reserved bytes after them."""
    memory = ctypes.string_at(args.getPtr(), 64)
    pointer = int.from_bytes(memory[:8], "little")
    count = int.from_bytes(memory[8:12], "little")
    array = ctypes.string_at(pointer, 32 * count) if count else b""
    pairs = [(array[32 * i:32 * i + 16].hex(), array[32 * i + 16:32 * i + 32].hex())
             for i in range(count)]
    return count, pairs, memory[12:]


# -- in this process: the package itself, no driver ---------------------------------------


def test_cuuuid_bytes_is_read_only_and_cu_uuid_writes_its_memory(driver: Any) -> None:
    value = driver.CUuuid()
    with pytest.raises(AttributeError, match="not writable"):
        value.bytes = bytes(16)
    built = cu_uuid(driver, GPU_A)
    assert isinstance(built, driver.CUuuid)
    assert built.bytes.hex() == raw(GPU_A)
    assert ctypes.string_at(built.getPtr(), 16).hex() == raw(GPU_A)
    for bad in ("0", "GPU-xyz", GPU_A + "00"):
        with pytest.raises(InvalidArgument, match="not a GPU UUID"):
            cu_uuid(driver, bad)


def test_nothing_moves_no_restore_arguments(driver: Any, support: DriverSupport) -> None:
    assert restore_args(driver, support, None) is None
    assert restore_args(driver, support, {}) is None
    assert restore_args(driver, support, {GPU_A: GPU_A, GPU_B: GPU_B}) is None
    # Spelled differently, the same GPU: still nothing moves.
    assert restore_args(driver, support, {GPU_A: GPU_A.upper().replace("GPU-", "GPU-", 1)}) is None


def test_swap_of_two_gpus_as_the_driver_reads_it(driver: Any, support: DriverSupport) -> None:
    args = restore_args(driver, support, {GPU_A: GPU_B, GPU_B: GPU_A})
    assert isinstance(args, driver.CUcheckpointRestoreArgs)
    assert args.gpuPairsCount == 2
    assert [(p.oldUuid.bytes.hex(), p.newUuid.bytes.hex()) for p in args.gpuPairs] == \
        [(raw(GPU_A), raw(GPU_B)), (raw(GPU_B), raw(GPU_A))]
    count, pairs, reserved = restore_memory(args)
    assert count == 2
    assert pairs == [(raw(GPU_A), raw(GPU_B)), (raw(GPU_B), raw(GPU_A))]
    assert reserved == bytes(len(reserved)), "reserved fields must be zero"


def test_two_gpus_onto_two_others(driver: Any, support: DriverSupport) -> None:
    args = restore_args(driver, support, {GPU_A: GPU_C, GPU_B: GPU_D})
    assert restore_memory(args)[:2] == (2, [(raw(GPU_A), raw(GPU_C)), (raw(GPU_B), raw(GPU_D))])
    # A map that keeps one GPU and moves the other still names both.
    args = restore_args(driver, support, {GPU_A: GPU_A, GPU_B: GPU_C})
    assert restore_memory(args)[:2] == (2, [(raw(GPU_A), raw(GPU_A)), (raw(GPU_B), raw(GPU_C))])


def test_bad_maps_are_refused_before_any_struct(driver: Any, support: DriverSupport) -> None:
    with pytest.raises(InvalidArgument, match="two GPUs onto one"):
        restore_args(driver, support, {GPU_A: GPU_C, GPU_B: GPU_C})
    with pytest.raises(InvalidArgument, match="not a GPU UUID"):
        restore_args(driver, support, {"0": GPU_B})


def test_remap_where_the_node_cannot_is_unimplemented_with_versions(driver: Any) -> None:
    import cuda.bindings

    version = cuda.bindings.__version__
    old_driver = check_support(driver, version, 12080)
    assert not old_driver.remap
    assert restore_args(driver, old_driver, {GPU_A: GPU_A}) is None
    with pytest.raises(Unimplemented) as err:
        restore_args(driver, old_driver, {GPU_A: GPU_B})
    assert f"cuda-bindings {version}, driver API 12.8" in str(err.value)
    assert "CUDA 13.0 (R580)" in str(err.value)


class Without:
    """The real module less some names: the shape of releases that lack them (13.0.0
    and 13.0.1 have no cuCheckpointProcessRestore, 12.x no CUcheckpointGpuPair)."""

    def __init__(self, module: Any, *hidden: str) -> None:
        self._module, self._hidden = module, hidden

    def __getattr__(self, name: str) -> Any:
        if name in self._hidden:
            raise AttributeError(name)
        return getattr(self._module, name)


def test_version_checks(driver: Any) -> None:
    assert check_support(driver, "13.5.0", 13000).remap
    assert check_support(driver, "13.4.0b1", 13020).remap
    for version in ("12.6.0", "11.8.7", "14.0.0", "nonsense"):
        with pytest.raises(FailedPrecondition, match="supports cuda-bindings 12.8 to 13.x"):
            check_support(driver, version, 13000)
    with pytest.raises(FailedPrecondition, match=r"driver API 12\.4: .*CUDA 12\.8 \(R570\)"):
        check_support(driver, "13.5.0", 12040)
    with pytest.raises(FailedPrecondition, match="lacks the checkpoint API .*cuCheckpointProcessRestore"):
        check_support(Without(driver, "cuCheckpointProcessRestore"), "13.0.1", 13000)
    no_pairs = check_support(Without(driver, "CUcheckpointGpuPair"), "12.9.0", 13000)
    assert not no_pairs.remap and "cannot pass GPU pairs" in no_pairs.remap_refusal


def test_cuda_errors_are_named_from_the_enum_without_a_driver(driver: Any) -> None:
    # No libcuda here: the name comes from the package's enum, the text is absent.
    assert error_name(driver, driver.CUresult.CUDA_ERROR_TIMEOUT) == ("CUDA_ERROR_TIMEOUT", "")
    assert error_name(driver, driver.CUresult.CUDA_ERROR_ILLEGAL_STATE)[0] == \
        "CUDA_ERROR_ILLEGAL_STATE"
    assert error_name(driver, 424242)[0] == "CUresult 424242"
    assert [CudaState(int(s)).name for s in driver.CUprocessState] == \
        [s.name.removeprefix("CU_PROCESS_STATE_") for s in driver.CUprocessState]


def test_backend_without_a_driver_fails_at_start_with_the_reason(driver: Any) -> None:
    with pytest.raises(FailedPrecondition, match="CUDA driver cannot run cuInit"):
        DriverApiBackend()


# -- in a child: the package's calls into a stand-in libcuda -------------------------------

VARIANTS = {"cuda-bindings 13 (venv)": None, "cuda-bindings 12.9": BINDINGS_12}


@pytest.fixture(params=list(VARIANTS))
def bindings(request: pytest.FixtureRequest) -> Path | None:
    where = VARIANTS[request.param]
    assert where is None or where.is_dir(), f"{where} is missing: run .ci/setup"
    return where


def scenario_state_machine(fake: FakeDriver) -> dict[str, Any]:
    fake.reset([GPU_A, GPU_B])
    fake.add_process(4242, "RUNNING", [GPU_A, GPU_B])
    backend = DriverApiBackend()
    seen = [backend.get_state(4242).name]
    backend.lock(4242, 2500)
    seen.append(backend.get_state(4242).name)
    backend.checkpoint(4242)
    seen.append(backend.get_state(4242).name)
    tid = backend.restore_thread_id(4242)
    backend.restore(4242, {GPU_A: GPU_A, GPU_B: GPU_B})  # nothing moves
    seen.append(backend.get_state(4242).name)
    backend.unlock(4242)
    seen.append(backend.get_state(4242).name)
    import cuda.bindings

    return {"states": seen, "tid": tid, "calls": fake.calls(), "version": cuda.bindings.__version__,
            "remap": backend.support.remap}


def test_state_machine_through_the_package(bindings: Path | None) -> None:
    result = run_scenario(scenario_state_machine, bindings=bindings)
    assert result["version"].startswith("12.9" if bindings else "13.")
    assert result["remap"] is (bindings is None)
    assert result["states"] == ["RUNNING", "LOCKED", "CHECKPOINTED", "LOCKED", "RUNNING"]
    assert result["tid"] == 4243
    calls = [c for c in result["calls"] if c["call"] != "cuCheckpointProcessGetState"]
    assert [c["call"] for c in calls] == [
        "cuInit", "cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint",
        "cuCheckpointProcessGetRestoreThreadId", "cuCheckpointProcessRestore",
        "cuCheckpointProcessUnlock"]
    assert all(c["result"] == 0 for c in calls), calls
    lock, checkpoint, _, restore, unlock = calls[1:]
    assert lock["timeout_ms"] == 2500 and not lock["args_null"]
    assert checkpoint["args_null"] and unlock["args_null"]
    assert restore["args_null"], "an identity map must reach the driver as no arguments"


def scenario_remaps(fake: FakeDriver) -> dict[str, Any]:
    fake.reset([GPU_A, GPU_B, GPU_C, GPU_D])
    results: dict[str, Any] = {}
    for pid, gpus, gpu_map in (
            (10, [GPU_A, GPU_B], {GPU_A: GPU_B, GPU_B: GPU_A}),  # swap
            (11, [GPU_A, GPU_B], {GPU_A: GPU_C, GPU_B: GPU_D}),  # both elsewhere
            (12, [GPU_A, GPU_B], {GPU_B: GPU_C}),  # only the GPU with memory: incomplete
            (13, [GPU_A], {GPU_A: GPU_C})):  # one checkpointed GPU moves
        fake.add_process(pid, "CHECKPOINTED", gpus)
        backend = DriverApiBackend()
        results[str(pid)] = {
            "outcome": outcome(lambda: backend.restore(pid, gpu_map)),  # noqa: B023
            "gpus_after": fake.process_gpus(pid),
            "driver_saw": (fake.calls("cuCheckpointProcessRestore") or [None])[-1],
        }
    return results


def test_remaps_reach_the_driver_complete_or_are_refused(bindings: Path | None) -> None:
    results = run_scenario(scenario_remaps, bindings=bindings)
    if bindings is not None:  # 12.x: no pairs in the package, nothing reaches the driver
        for entry in results.values():
            assert entry["outcome"]["error"] == "Unimplemented", entry
            assert "cuda-bindings 12.9" in entry["outcome"]["message"], entry
            assert "cannot pass GPU pairs" in entry["outcome"]["message"], entry
            assert entry["driver_saw"] is None
        return
    swap, elsewhere, incomplete, single = (results[k] for k in ("10", "11", "12", "13"))
    assert swap["outcome"] == {"ok": None}
    assert swap["driver_saw"]["pairs"] == [[raw(GPU_A), raw(GPU_B)], [raw(GPU_B), raw(GPU_A)]]
    assert swap["driver_saw"]["count"] == 2 and swap["driver_saw"]["reserved_zero"]
    assert swap["gpus_after"] == [GPU_B, GPU_A]
    assert elsewhere["outcome"] == {"ok": None} and elsewhere["gpus_after"] == [GPU_C, GPU_D]
    # The driver refuses a map that leaves out a checkpointed GPU.
    assert incomplete["outcome"]["error"] == "CudaError", incomplete
    assert "CUDA_ERROR_INVALID_VALUE: invalid argument" in incomplete["outcome"]["message"]
    assert incomplete["gpus_after"] == [GPU_A, GPU_B]
    assert single["outcome"] == {"ok": None} and single["gpus_after"] == [GPU_C]


def scenario_errors(fake: FakeDriver) -> dict[str, Any]:
    fake.reset([GPU_A])
    fake.add_process(9, "RUNNING", [GPU_A])
    backend = DriverApiBackend()
    results = {"checkpoint_running": outcome(lambda: backend.checkpoint(9))}
    fake.fail_next("cuCheckpointProcessLock", 909)  # CUDA_ERROR_TIMEOUT
    results["lock_timeout"] = outcome(lambda: backend.lock(9, 100))
    results["state_after_timeout"] = backend.get_state(9).name
    fake.fail_next("cuCheckpointProcessLock", 1)
    results["lock_invalid"] = outcome(lambda: backend.lock(9, 100_000))
    results["unknown_pid"] = outcome(lambda: backend.get_state(31337))
    results["is_cuda"] = [backend.is_cuda_process(9), backend.is_cuda_process(31337)]
    fake.reset([GPU_B])  # the checkpointed GPU is gone and no map says where to go
    fake.add_process(9, "CHECKPOINTED", [GPU_A])
    results["restore_gpu_gone"] = outcome(lambda: backend.restore(9))
    fake.fail_next("cuInit", 3)
    results["init"] = outcome(DriverApiBackend)
    fake.reset([GPU_A], driver_api=12040)
    results["old_driver"] = outcome(DriverApiBackend)
    fake.reset([GPU_A, GPU_B], driver_api=12080)
    fake.add_process(5, "CHECKPOINTED", [GPU_A])
    older = DriverApiBackend()
    results["driver_12_8_remap"] = outcome(lambda: older.restore(5, {GPU_A: GPU_B}))
    results["driver_12_8_in_place"] = outcome(lambda: older.restore(5, {GPU_A: GPU_A}))
    return results


def test_cuda_results_become_kybernate_errors(bindings: Path | None) -> None:
    r = run_scenario(scenario_errors, bindings=bindings)
    assert r["checkpoint_running"] == {
        "error": "CudaError",
        "message": "cuCheckpointProcessCheckpoint failed: pid 9: CUDA_ERROR_ILLEGAL_STATE: "
                   "the operation is not permitted in this state"}
    assert r["lock_timeout"] == {
        "error": "CudaLockTimeout",
        "message": "CUDA lock of pid 9 timed out after 100 ms "
                   "(CUDA_ERROR_TIMEOUT: the operation timed out)"}
    assert r["state_after_timeout"] == "RUNNING"
    assert r["lock_invalid"]["error"] == "CudaError"
    assert "CUDA_ERROR_INVALID_VALUE" in r["lock_invalid"]["message"]
    assert r["unknown_pid"]["error"] == "CudaError"
    assert "CUDA_ERROR_NOT_FOUND" in r["unknown_pid"]["message"]
    assert r["is_cuda"] == [True, False]
    assert r["init"] == {"error": "CudaError", "message": "cuInit failed: CUDA_ERROR_NOT_INITIALIZED:"
                                                            " initialization error"}
    assert r["old_driver"]["error"] == "FailedPrecondition"
    assert "driver API 12.4" in r["old_driver"]["message"]
    assert r["driver_12_8_remap"]["error"] == "Unimplemented"
    assert "driver API 12.8" in r["driver_12_8_remap"]["message"]
    assert r["driver_12_8_in_place"] == {"ok": None}
    assert r["restore_gpu_gone"]["error"] == "CudaError"
    assert "CUDA_ERROR_INVALID_DEVICE" in r["restore_gpu_gone"]["message"]
