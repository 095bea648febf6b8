"""CheckpointToolBackend against stand-ins for `cuda-checkpoint` and `nvidia-smi` put on
PATH (no real tool can run without a GPU): the command lines it builds, the outputs it
parses, the errors it reports."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from kybernate.cuda import CudaError, CudaLockTimeout, CudaState, load_backend
from kybernate.cuda.tool import CheckpointToolBackend, device_map_argument
from kybernate.errors import FailedPrecondition, InvalidArgument

GPU_A = "GPU-aaaaaaaa-0000-4000-8000-000000000001"
GPU_B = "GPU-bbbbbbbb-0000-4000-8000-000000000002"

# A stand-in keeping per-pid state in $FAKE_TOOL_DIR/state.json and logging its argv.
FAKE_CUDA_CHECKPOINT = r'''#!PYTHON
import json, os, sys, time
d = os.environ["FAKE_TOOL_DIR"]
with open(os.path.join(d, "calls.jsonl"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
args = sys.argv[1:]
pid = args[args.index("--pid") + 1]
path = os.path.join(d, "state.json")
state = json.load(open(path)) if os.path.exists(path) else {}
fail = os.path.join(d, "fail")
if os.path.exists(fail):
    sys.stderr.write(open(fail).read())
    sys.exit(1)
if "--get-state" in args:
    if pid not in state:
        sys.stderr.write("Could not get state: CUDA_ERROR_NOT_FOUND\n")
        sys.exit(1)
    print(state[pid])
    sys.exit(0)
if "--get-restore-tid" in args:
    print(f"restore tid {int(pid) + 7}")
    sys.exit(0)
action = args[args.index("--action") + 1]
if action == "lock" and os.path.exists(os.path.join(d, "hang")):
    time.sleep(int(args[args.index("--timeout") + 1]) / 1000)
    sys.stderr.write("Lock timed out\n")
    sys.exit(1)
moves = {"lock": ("running", "locked"), "checkpoint": ("locked", "checkpointed"),
         "restore": ("checkpointed", "locked"), "unlock": ("locked", "running")}
source, target = moves[action]
if state.get(pid) != source:
    sys.stderr.write(f"Could not {action} process {pid}: CUDA_ERROR_ILLEGAL_STATE\n")
    sys.exit(1)
state[pid] = target
json.dump(state, open(path, "w"))
'''

FAKE_NVIDIA_SMI = r'''#!/bin/sh
case "$1" in
  --query-gpu=driver_version) echo 580.65.06 ;;
  --query-gpu=*) printf '0, %s, NVIDIA H100 80GB HBM3, 81559, 80000\n1, %s, NVIDIA H100 80GB HBM3, 81559, 1000\n' "$GPU_A" "$GPU_B" ;;
  --query-compute-apps=*) printf '4242, %s, 1024\n4242, %s, 512\n99, %s, 7\n' "$GPU_A" "$GPU_B" "$GPU_A" ;;
  *) echo "unexpected $*" >&2; exit 2 ;;
esac
'''


@pytest.fixture
def tool_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("cuda-checkpoint", FAKE_CUDA_CHECKPOINT.replace("PYTHON", sys.executable)),
                       ("nvidia-smi", FAKE_NVIDIA_SMI)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_TOOL_DIR", str(tmp_path))
    monkeypatch.setenv("GPU_A", GPU_A)
    monkeypatch.setenv("GPU_B", GPU_B)
    return tmp_path


def calls(tool_dir: Path) -> list[list[str]]:
    return [json.loads(line) for line in (tool_dir / "calls.jsonl").read_text().splitlines()]


def set_state(tool_dir: Path, pid: int, state: str) -> None:
    (tool_dir / "state.json").write_text(json.dumps({str(pid): state}))


def test_command_lines_and_state_parsing(tool_dir: Path) -> None:
    backend = CheckpointToolBackend()
    pid = 4242
    set_state(tool_dir, pid, "running")
    assert backend.is_cuda_process(pid)
    backend.lock(pid, 1500)
    assert backend.get_state(pid) is CudaState.LOCKED
    backend.checkpoint(pid)
    assert backend.get_state(pid) is CudaState.CHECKPOINTED
    backend.restore(pid, {GPU_A: GPU_B})
    backend.unlock(pid)
    assert backend.get_state(pid) is CudaState.RUNNING
    assert backend.restore_thread_id(pid) == pid + 7
    assert calls(tool_dir) == [
        ["--get-state", "--pid", "4242"],
        ["--action", "lock", "--pid", "4242", "--timeout", "1500"],
        ["--get-state", "--pid", "4242"],
        ["--action", "checkpoint", "--pid", "4242"],
        ["--get-state", "--pid", "4242"],
        ["--action", "restore", "--pid", "4242", "--device-map", f"{GPU_A}={GPU_B}"],
        ["--action", "unlock", "--pid", "4242"],
        ["--get-state", "--pid", "4242"],
        ["--get-restore-tid", "--pid", "4242"],
    ]


def test_errors_carry_the_tools_stderr(tool_dir: Path) -> None:
    backend = CheckpointToolBackend()
    set_state(tool_dir, 77, "running")
    with pytest.raises(CudaError, match="CUDA_ERROR_ILLEGAL_STATE") as err:
        backend.checkpoint(77)
    assert err.value.pid == 77 and "Could not checkpoint process 77" in str(err.value)
    assert not backend.is_cuda_process(78)  # the tool knows no such CUDA process
    (tool_dir / "fail").write_text("cuda-checkpoint: driver too old\n")
    with pytest.raises(CudaError, match="driver too old"):
        backend.get_state(77)


def test_lock_timeout_is_reported_as_such(tool_dir: Path) -> None:
    backend = CheckpointToolBackend()
    set_state(tool_dir, 55, "running")
    (tool_dir / "hang").touch()
    with pytest.raises(CudaLockTimeout, match="lock of pid 55 timed out after 200 ms"):
        backend.lock(55, 200)
    assert backend.get_state(55) is CudaState.RUNNING


def test_device_map_is_checked_before_the_tool_runs(tool_dir: Path) -> None:
    backend = CheckpointToolBackend()
    with pytest.raises(InvalidArgument, match="not a GPU UUID: 'gpu0'"):
        backend.restore(9, {"gpu0": GPU_B})
    with pytest.raises(InvalidArgument, match="two GPUs onto one"):
        device_map_argument({GPU_A: GPU_B, GPU_B: GPU_B})
    assert not (tool_dir / "calls.jsonl").exists()


def test_inventory_and_usage_from_nvidia_smi(tool_dir: Path) -> None:
    backend = CheckpointToolBackend()
    gpus = backend.gpus()
    assert [(g.index, g.uuid, g.model) for g in gpus] == [
        (0, GPU_A, "NVIDIA H100 80GB HBM3"), (1, GPU_B, "NVIDIA H100 80GB HBM3")]
    assert gpus[0].memory_total == 81559 << 20 and gpus[1].memory_free == 1000 << 20
    assert backend.process_gpu_memory(4242) == {GPU_A: 1024 << 20, GPU_B: 512 << 20}
    assert backend.process_gpu_memory(1) == {}
    assert backend.driver_version() == "580.65.06"


def test_auto_picks_the_tool_without_cuda_bindings(
        tool_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    assert isinstance(load_backend("auto"), CheckpointToolBackend)
    monkeypatch.setenv("PATH", str(tool_dir))  # no bin/ on it
    with pytest.raises(FailedPrecondition, match="cuda-checkpoint not found on PATH"):
        load_backend("tool")
