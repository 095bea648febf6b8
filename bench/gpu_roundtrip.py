#!/usr/bin/env python3
"""GPU checkpoint round trip through DriverApiBackend, timed per step and per GB.

On a GPU machine (driver R550+, PyTorch, cuda-bindings, nvidia-ml-py):

    python3 bench/gpu_roundtrip.py results.json --sizes-gb 1,4,16 --repeat 3

For every size a worker process fills a CUDA tensor of that many bytes with seeded
random integers and reports its checksum; the benchmark then locks, checkpoints (NVML
must show the process's GPU memory released), restores and unlocks it, has the worker
recompute the checksum, and records the seconds of every step. Written to the JSON
file: the device, the driver and CUDA versions, and per size and repetition the step
times, seconds per GB and GB/s. `worker` is the process under test (also used by
tests/gpu/test_cuda_driver.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GB = 10**9


def ensure_kybernate_importable() -> None:
    """The GPU machine has no package registry: map the repository's folders to the
    `kybernate` package the way pyproject does, when kybernate is not installed."""
    try:
        import kybernate.cuda  # noqa: F401
        return
    except ImportError:
        pass
    for name, folder in (("kybernate", "core"), ("kybernate.cuda", "cuda")):
        spec = importlib.util.spec_from_file_location(
            name, REPO / folder / "__init__.py", submodule_search_locations=[str(REPO / folder)])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


# -- the process under test ------------------------------------------------------------------


def worker(size_bytes: int, seed: int) -> None:
    """Hold `size_bytes` of seeded random int64 on GPU 0; answer `check` with the checksum
    recomputed on the GPU, `exit` by leaving. Blocks in stdin between commands, so it makes
    no CUDA call while it is locked or checkpointed."""
    import torch

    device = torch.device("cuda:0")
    generator = torch.Generator(device=device).manual_seed(seed)
    count = max(1, size_bytes // 8)
    tensor = torch.randint(0, 2**62, (count,), dtype=torch.int64, device=device,
                           generator=generator)
    weights = torch.arange(1, 1 + min(count, 1 << 20), dtype=torch.int64, device=device)

    def checksum() -> list[int]:
        # Exact integer sums (wrapping alike each time): unordered sum and a weighted
        # one over the head, which a permutation of the data would change.
        torch.cuda.synchronize()
        head = tensor[: weights.numel()]
        return [int(tensor.sum().item()), int((head * weights).sum().item())]

    reply({"ready": True, "pid": os.getpid(), "bytes": count * 8, "checksum": checksum(),
           "device": torch.cuda.get_device_name(device)})
    for line in sys.stdin:
        command = line.strip()
        if command == "check":
            reply({"checksum": checksum()})
        elif command == "exit":
            return


def reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class Worker:
    """The benchmark's handle on a worker process."""

    def __init__(self, size_bytes: int, seed: int = 1234) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "worker", "--bytes", str(size_bytes),
             "--seed", str(seed)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self._read()
        self.pid: int = ready["pid"]
        self.bytes: int = ready["bytes"]
        self.checksum: list[int] = ready["checksum"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {self.proc.wait()} before answering")
        return json.loads(line)

    def check(self) -> list[int]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("check\n")
        self.proc.stdin.flush()
        return self._read()["checksum"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("exit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# -- the benchmark ----------------------------------------------------------------------------


def round_trip(backend: Any, worker: Worker, gpu_map: dict[str, str] | None = None
               ) -> dict[str, Any]:
    """lock -> checkpoint -> restore -> unlock on one worker; seconds per step and the
    GPU memory NVML showed for it before and after the checkpoint."""
    from kybernate.cuda import CudaState

    held_before = sum(backend.process_gpu_memory(worker.pid).values())
    steps: dict[str, float] = {}
    started = time.monotonic()
    backend.lock(worker.pid, 30_000)
    steps["lock"] = time.monotonic() - started
    started = time.monotonic()
    backend.checkpoint(worker.pid)
    steps["checkpoint"] = time.monotonic() - started
    state_checkpointed = backend.get_state(worker.pid)
    held_checkpointed = sum(backend.process_gpu_memory(worker.pid).values())
    started = time.monotonic()
    backend.restore(worker.pid, gpu_map)
    steps["restore"] = time.monotonic() - started
    started = time.monotonic()
    backend.unlock(worker.pid)
    steps["unlock"] = time.monotonic() - started
    checksum = worker.check()
    return {
        "steps_s": steps,
        "gpu_memory_before": held_before,
        "gpu_memory_checkpointed": held_checkpointed,
        "state_checkpointed": state_checkpointed.name,
        "released": state_checkpointed is CudaState.CHECKPOINTED and held_checkpointed == 0,
        "intact": checksum == worker.checksum,
        "state_after": backend.get_state(worker.pid).name,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        work = argparse.ArgumentParser(prog="gpu_roundtrip.py worker")
        work.add_argument("--bytes", type=int, required=True)
        work.add_argument("--seed", type=int, default=1234)
        worker_args = work.parse_args(argv[1:])
        worker(worker_args.bytes, worker_args.seed)
        return 0
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="JSON file to write the results to")
    parser.add_argument("--sizes-gb", default="1,4", help="comma-separated sizes in GB (1e9)")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)

    ensure_kybernate_importable()
    from kybernate.cuda.driver import DriverApiBackend

    backend = DriverApiBackend()
    from cuda.bindings import driver

    gpus = backend.gpus()
    err, cuda_version = driver.cuDriverGetVersion()
    results: dict[str, Any] = {
        "device": [{"index": g.index, "uuid": g.uuid, "model": g.model,
                    "memory_total": g.memory_total} for g in gpus],
        "driver_version": backend.driver_version(),
        "cuda_driver_api_version": int(cuda_version) if int(err) == 0 else None,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "runs": [],
    }
    failed = False
    for size_gb in (float(s) for s in args.sizes_gb.split(",") if s.strip()):
        for repetition in range(args.repeat):
            handle = Worker(int(size_gb * GB))
            try:
                run = round_trip(backend, handle)
            finally:
                handle.close()
            gb = handle.bytes / GB
            run.update({
                "size_gb": gb,
                "repetition": repetition,
                "seconds_per_gb": {step: s / gb for step, s in run["steps_s"].items()},
                "gb_per_s": {step: (gb / s if s > 0 else None)
                             for step, s in run["steps_s"].items()},
            })
            failed |= not (run["released"] and run["intact"])
            results["runs"].append(run)
            print(json.dumps({k: run[k] for k in ("size_gb", "steps_s", "released", "intact")}))
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
