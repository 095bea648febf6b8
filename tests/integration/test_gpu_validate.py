"""bench/gpu_validate.py on this machine, which has no GPU: it must end at once with a
results file that says "no GPU" for every GPU part; and with the stand-in libcuda
(tests/support/fake_libcuda.c) its container part must run the workload through a
private containerd, runc, CRIU, the agent and the shim, and find the checksum intact
after a checkpoint and a restore (the stand-in has no CUDA state to save, so this is
the container path around a non-GPU process: what the GPU machine adds is the driver)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.fake_libcuda import library_dir

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_validate.py"


def run_validate(out: Path, *args: str, timeout: float) -> dict:
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], cwd="/",
                          capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    files = sorted(out.glob("gpu-*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_without_a_gpu_every_gpu_part_says_so(tmp_path: Path) -> None:
    result = run_validate(tmp_path, timeout=60)
    parts = result["parts"]
    environment = parts["environment"]
    assert environment["status"] == "ok"
    assert environment["gpu"] == "no GPU: /dev/nvidiactl is absent"
    assert environment["packages"]["cuda-bindings"], environment
    assert {name: part["status"] for name, part in parts.items() if name != "environment"} == \
        dict.fromkeys(["bandwidth", "roundtrip", "remap", "container", "cold_start", "gpu_tests"],
                      "no GPU: /dev/nvidiactl is absent")


def test_container_part_round_trips_the_workload_with_the_stand_in(tmp_path: Path) -> None:
    result = run_validate(tmp_path, "--libcuda-dir", str(library_dir()), "--parts",
                          "environment,container", "--cold-start-gb", "0.25", timeout=300)
    part = result["parts"]["container"]
    details = {k: v for k, v in part.items() if k not in ("agent_log_tail", "containerd_log_tail")}
    assert part["status"] == "ok", json.dumps(part, indent=1)[-6000:]
    assert part["workload"]["intact"] and part["after_checkpoint"]["intact"], details
    assert part["after_restore"]["checksum"] == part["workload"]["checksum"], details
    assert part["intact"] and part["task_status"] == "RUNNING", details
    assert part["checkpoint_s"] > 0 and part["restore_s"] > 0, details
