#!/usr/bin/env python3
"""Kybernate's CUDA path on a real GPU, in one bounded run that records everything.

    python3 bench/gpu_validate.py [--carry .carry] [--sizes-gb 1,4,16] [--budget-s 480]
                                  [--parts environment,bandwidth,...] [--out bench/results]

Writes bench/results/gpu-<UTC stamp>.json after every part, so a run cut short still
leaves what it measured (the part under way shows as "running"). Parts, each bounded
in time and independent (a failure is recorded and the next part runs):

- environment: device(s), driver, CUDA driver API, cuda-bindings, nvidia-ml-py, torch
  (if present), cuda-checkpoint, what the node supports (kybernate.cuda.driver).
- bandwidth: pinned host<->GPU copy rates and host memcpy, measured in this run: the
  baseline the checkpoint and restore rates are set against (goal: 80% of it).
- roundtrip: for each size, bench/gpu_workload.py fills that much GPU memory; lock,
  checkpoint (NVML must show the memory released), restore with the map the agent
  computes, unlock, checksum; with the driver backend, then the cuda-checkpoint tool.
- remap: where two GPUs of one model are present, a restore onto the other GPU with
  the complete map, and what the driver says to an incomplete one.
- cold_start: a process loading a file of a few GB into GPU memory, from exec to
  loaded, against restoring it from its checkpoint.
- gpu_tests: tests/gpu under pytest (carried along where the machine lacks it).
- container: a private containerd, runc, CRIU and the Kybernate agent and shim run the
  workload in a container with the GPU's device nodes; cold start, checkpoint through
  ctr, container removed, restore through ctr, checksum.

Without a GPU (no /dev/nvidiactl, or no usable driver) every GPU part records "no GPU"
with the reason and the run ends at once. --carry DIR unpacks what bench/gpu_carry.sh
prepared (containerd, runc, CRIU, wheels) into a temporary prefix and runs from there.
--libcuda-dir DIR loads the libcuda.so.1 found there (tests' stand-in) to try the
script's own steps on a machine without a GPU; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import datetime
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import traceback
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GB = 10**9
PARTS = ("environment", "bandwidth", "roundtrip", "remap", "container", "cold_start", "gpu_tests")
# Seconds each part may take at most (the whole run also stops at --budget-s).
PART_LIMITS = {"environment": 30, "bandwidth": 60, "roundtrip": 240, "remap": 90,
               "cold_start": 90, "container": 240, "gpu_tests": 120}
CARRY_READY = "KYBERNATE_CARRY_PREFIX"
LOCK_TIMEOUT_MS = 30_000

sys.path.insert(0, str(Path(__file__).resolve().parent))
# gpu_workload.py beside this file, not through the repository root (see _RepoFinder).
from gpu_workload import Workload

# -- getting Kybernate importable without the repository root on sys.path ----------------------


def _repo_packages() -> dict[str, str]:
    """pyproject's package-dir: subpackage -> repository folder."""
    with open(REPO / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["tool"]["setuptools"]["package-dir"])


REPO_PACKAGES = _repo_packages()


class _RepoFinder(importlib.abc.MetaPathFinder):
    """kybernate.X from the repository's folders, the way pyproject maps them, for a
    machine where Kybernate is not installed. The repository root itself must not go on
    sys.path: its cuda/ folder would shadow NVIDIA's `cuda` namespace."""

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        folder = REPO_PACKAGES.get(name)
        if folder is None:
            return None
        init = REPO / folder / "__init__.py"
        return importlib.util.spec_from_file_location(
            name, init, submodule_search_locations=[str(init.parent)])


def ensure_kybernate_importable() -> str:
    try:
        import kybernate.cuda  # noqa: F401

        return "installed"
    except ImportError:
        for name in [m for m in sys.modules if m == "kybernate" or m.startswith("kybernate.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _RepoFinder())
        return "repository folders"


# -- the carry: containerd, runc, CRIU and wheels brought along ---------------------------------


def install_carry(carry: Path) -> tuple[str, dict[str, str]]:
    """Unpack the carry into a temporary prefix: the system tools under root/, the wheels
    into a virtual environment that also sees this Python's own packages (cuda-bindings,
    torch). A venv, not PYTHONPATH: the shim runs `python -I`, which ignores it. Returns
    the venv's python and the environment to run it in."""
    prefix = Path(tempfile.mkdtemp(prefix="kyb-carry-", dir="/tmp"))
    root, venv = prefix / "root", prefix / "venv"
    with tarfile.open(carry / "system.tar.xz") as tar:
        if hasattr(tarfile, "fully_trusted_filter"):  # 3.12: say so, our own archive
            tar.extractall(root, filter="fully_trusted")
        else:
            tar.extractall(root)  # our own archive, made by bench/gpu_carry.sh
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages",
                    str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    for wheel in sorted((carry / "wheels").glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    for name, module in (("containerd-shim-kybernate-v1", "kybernate.shim"),
                         ("kybernate", "kybernate")):
        script = venv / "bin" / name
        script.write_text(f'#!/bin/sh\nexec "{python}" -m {module} "$@"\n')
        script.chmod(0o755)
    env = dict(os.environ)
    env[CARRY_READY] = str(prefix)
    env["PATH"] = os.pathsep.join([str(venv / "bin"), str(root / "usr/bin"),
                                   str(root / "usr/sbin"), env.get("PATH", "/usr/bin:/bin")])
    libs = [str(root / "usr/lib/x86_64-linux-gnu"), str(root / "lib/x86_64-linux-gnu")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    return str(python), env


# -- the run and its results file -----------------------------------------------------------------


class PartTimeout(Exception):
    pass


class Run:
    """The results document, written again after every part."""

    def __init__(self, out_dir: Path, budget_s: float) -> None:
        self.stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        self.path = out_dir / f"gpu-{self.stamp}.json"
        self.deadline = time.monotonic() + budget_s
        self.doc: dict[str, Any] = {"benchmark": "gpu_validate", "stamp": self.stamp,
                                    "budget_s": budget_s, "parts": {}}
        self.cleanups: list[Callable[[], None]] = []
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.partial")
        partial.write_text(json.dumps(self.doc, indent=2, default=str) + "\n")
        os.replace(partial, self.path)

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[dict[str, Any]]:
        """Records the part's result, status and seconds; never lets its failure out."""
        limit = max(1, int(min(PART_LIMITS[name], self.left_s())))
        record: dict[str, Any] = {"status": "running", "limit_s": limit}
        self.doc["parts"][name] = record
        self.write()
        started = time.monotonic()
        if self.left_s() < 5:
            record["status"] = "skipped: the run's time budget is spent"
            self.write()
            yield record
            return

        def expire(_signum: int, _frame: FrameType | None) -> None:
            raise PartTimeout(f"{name} ran past its {limit} s")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.alarm(limit)
        try:
            yield record
            if record["status"] == "running":
                record["status"] = "ok"
        except Exception as err:  # noqa: BLE001 - recorded; the next part still runs
            record["status"] = "failed"
            record["error"] = f"{type(err).__name__}: {err}"
            record["traceback"] = traceback.format_exc(limit=8)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
            while self.cleanups:
                with contextlib.suppress(Exception):
                    self.cleanups.pop()()
            record["seconds"] = round(time.monotonic() - started, 3)
            self.write()
            print(f"{name}: {record['status']} ({record['seconds']} s)"
                  + (f" {record.get('error', '')}" if record["status"] == "failed" else ""),
                  flush=True)


def timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def rate(size: int, seconds: float | None) -> float | None:
    return round(size / GB / seconds, 3) if seconds else None


# -- parts -------------------------------------------------------------------------------------


def environment(run: Run, record: dict[str, Any], libcuda_dir: str | None) -> Any:
    """Versions and devices; returns the driver backend, or None with the reason recorded."""
    record["kybernate_from"] = ensure_kybernate_importable()
    record["machine"] = {"kernel": platform.release(), "python": platform.python_version(),
                         "cpus": os.cpu_count(), "memory_bytes": _memory_total()}
    record["packages"] = {name: _version(name) for name in
                          ("cuda-bindings", "cuda-pathfinder", "nvidia-ml-py", "torch")}
    tool = shutil.which("cuda-checkpoint")
    record["cuda_checkpoint"] = {"path": tool, "help": _first_lines([tool, "--help"], 2)
                                 if tool else None}
    record["system_tools"] = {t: _first_lines([t, "--version"], 1) if shutil.which(t) else None
                              for t in ("containerd", "ctr", "runc", "criu")}
    if libcuda_dir:
        ctypes.CDLL(str(Path(libcuda_dir) / "libcuda.so.1"), mode=ctypes.RTLD_GLOBAL)
        record["libcuda"] = f"stand-in from {libcuda_dir}: figures mean nothing"
    elif not os.path.exists("/dev/nvidiactl"):
        record["gpu"] = "no GPU: /dev/nvidiactl is absent"
        return None
    from kybernate.cuda.driver import DriverApiBackend
    from kybernate.errors import KybernateError

    try:
        backend = DriverApiBackend()
    except KybernateError as err:
        record["gpu"] = f"no GPU: {err}"
        return None
    support = backend.support
    record["support"] = {"cuda_bindings": support.bindings_version,
                         "driver_api": support.driver_api, "remap": support.remap,
                         "remap_refusal": support.remap_refusal}
    try:
        record["driver_version"] = backend.driver_version()
        record["devices"] = [g.__dict__ for g in backend.gpus()]
    except KybernateError as err:
        record["nvml"] = f"unusable: {err}"
        if not libcuda_dir:
            record["gpu"] = f"no GPU: {err}"
            return None
    record["gpu"] = "present"
    return backend


def bandwidth(run: Run, record: dict[str, Any], size: int) -> dict[str, Any]:
    with Workload(size) as work:
        run.cleanups.append(work.close)
        record.update(work.ask("bandwidth", timeout=120))
    record["host_memcpy_gb_s"] = _host_memcpy_rate(min(size, 1 << 30))
    return record


def roundtrip(run: Run, record: dict[str, Any], backend: Any, sizes: list[int],
              baseline: dict[str, Any]) -> None:
    from kybernate.agent.gpu import GpuControl

    control = GpuControl("driver", None, backend=backend)
    tool = _tool_backend()
    record["runs"] = []
    for size in sizes:
        entry: dict[str, Any] = {"bytes": size, "gb": size / GB}
        record["runs"].append(entry)
        free = max((g.memory_free for g in backend.gpus()), default=0)
        if size > free * 0.9:
            entry["status"] = f"skipped: {size} bytes do not fit ({free} free)"
            continue
        if run.left_s() < 20 + size / GB * 6:
            entry["status"] = "skipped: not enough time left in the budget"
            continue
        with Workload(size, ready_timeout=max(60.0, run.left_s())) as work:
            run.cleanups.append(work.close)
            entry["workload"] = work.ready
            entry["driver"] = _attempt(lambda: _driver_cycle(backend, control, work, baseline))
            if tool is not None:
                entry["tool"] = _attempt(lambda: _tool_cycle(backend, tool, work, baseline))
            entry["status"] = "ok" if all(
                entry.get(k, {}).get("intact") for k in ("driver", "tool") if k in entry
            ) else "failed"
        run.write()


def _driver_cycle(backend: Any, control: Any, work: Workload,
                  baseline: dict[str, Any]) -> dict[str, Any]:
    """The agent's own sequence over one process: coordinator steps and restore map."""
    import asyncio

    coordinator = control.coordinator
    pid, size = work.pid, work.ready["bytes"]
    result: dict[str, Any] = {}
    gpu = work.ready["device_uuid"]
    result["covered_gpus"] = sorted(backend.process_gpus(pid))
    result["nvml_memory_before"] = backend.process_gpu_memory(pid)
    free_before = _free(backend, gpu)

    async def cycle() -> None:
        steps: dict[str, float] = {}
        started = time.perf_counter()
        await coordinator.lock_all([pid], LOCK_TIMEOUT_MS)
        steps["lock"] = time.perf_counter() - started
        inventory = await coordinator.snapshot_inventory([pid])
        started = time.perf_counter()
        await coordinator.checkpoint_all([pid])
        steps["checkpoint"] = time.perf_counter() - started
        result["state_checkpointed"] = backend.get_state(pid).name
        result["nvml_memory_checkpointed"] = backend.process_gpu_memory(pid)
        result["gpu_freed_bytes"] = _free(backend, gpu) - free_before
        gpu_map = await control.restore_fit({"cuda": inventory})
        result["agent_map"] = gpu_map
        started = time.perf_counter()
        await coordinator.restore_all([pid], gpu_map)
        steps["restore"] = time.perf_counter() - started
        started = time.perf_counter()
        await coordinator.unlock_all([pid])
        steps["unlock"] = time.perf_counter() - started
        result["steps_s"] = {k: round(v, 6) for k, v in steps.items()}

    asyncio.run(cycle())
    return _finish(result, work, size, baseline, backend)


def _tool_cycle(backend: Any, tool: Any, work: Workload,
                baseline: dict[str, Any]) -> dict[str, Any]:
    pid, size = work.pid, work.ready["bytes"]
    result: dict[str, Any] = {}
    steps = {"lock": timed(lambda: tool.lock(pid, LOCK_TIMEOUT_MS)),
             "checkpoint": timed(lambda: tool.checkpoint(pid))}
    result["state_checkpointed"] = tool.get_state(pid).name
    result["nvml_memory_checkpointed"] = backend.process_gpu_memory(pid)
    steps["restore"] = timed(lambda: tool.restore(pid))
    steps["unlock"] = timed(lambda: tool.unlock(pid))
    result["steps_s"] = {k: round(v, 6) for k, v in steps.items()}
    return _finish(result, work, size, baseline, backend)


def _finish(result: dict[str, Any], work: Workload, size: int, baseline: dict[str, Any],
            backend: Any) -> dict[str, Any]:
    steps = result["steps_s"]
    result["state_after"] = backend.get_state(work.pid).name
    result["released"] = (result["state_checkpointed"] == "CHECKPOINTED"
                          and sum(result["nvml_memory_checkpointed"].values()) == 0)
    check = work.ask("check")
    result["checksum_before"], result["checksum_after"] = work.checksum, check["checksum"]
    result["intact"] = bool(check["intact"]) and check["checksum"] == work.checksum
    result["seconds_per_gb"] = {k: round(v / (size / GB), 6) for k, v in steps.items()}
    result["gb_per_s"] = {k: rate(size, v) for k, v in steps.items()}
    for step, reference in (("checkpoint", "pinned_dtoh_gb_s"), ("restore", "pinned_htod_gb_s")):
        achieved, base = result["gb_per_s"].get(step), baseline.get(reference)
        if achieved and base:
            result[f"{step}_over_{reference}"] = round(achieved / base, 3)
            result[f"{step}_meets_80_percent"] = achieved >= 0.8 * base
    return result


def remap(run: Run, record: dict[str, Any], backend: Any) -> None:
    gpus = backend.gpus()
    by_model: dict[str, list[Any]] = {}
    for gpu in gpus:
        by_model.setdefault(gpu.model, []).append(gpu)
    pair = next((group[:2] for group in by_model.values() if len(group) >= 2), None)
    if pair is None:
        record["status"] = f"skipped: needs two GPUs of one model; this node has {len(gpus)}"
        return
    if not backend.support.remap:
        record["status"] = f"skipped: {backend.support.remap_refusal}"
        return
    first, second = pair
    swap = {first.uuid: second.uuid, second.uuid: first.uuid}
    with Workload(1 << 30, device=first.uuid) as work:
        run.cleanups.append(work.close)
        covered = sorted(backend.process_gpus(work.pid))
        gpu_map = {uuid: swap.get(uuid, uuid) for uuid in covered}
        record["covered_gpus"], record["map"] = covered, gpu_map
        backend.lock(work.pid, LOCK_TIMEOUT_MS)
        backend.checkpoint(work.pid)
        record["restore_s"] = round(timed(lambda: backend.restore(work.pid, gpu_map)), 6)
        backend.unlock(work.pid)
        record["memory_after"] = backend.process_gpu_memory(work.pid)
        check = work.ask("check")
        record["intact"] = bool(check["intact"]) and check["checksum"] == work.checksum
        record["moved"] = set(record["memory_after"]) == {second.uuid}
    with Workload(256 << 20, device=first.uuid) as work:  # what the driver says to less
        run.cleanups.append(work.close)
        backend.lock(work.pid, LOCK_TIMEOUT_MS)
        backend.checkpoint(work.pid)
        partial = {first.uuid: second.uuid}
        record["incomplete_map"] = {"map": partial,
                                    "outcome": _attempt(lambda: backend.restore(work.pid, partial))}
        if backend.get_state(work.pid).name == "CHECKPOINTED":
            full = {uuid: swap.get(uuid, uuid) for uuid in record["covered_gpus"]}
            record["incomplete_map"]["then_complete"] = _attempt(
                lambda: backend.restore(work.pid, full))
        with contextlib.suppress(Exception):
            backend.unlock(work.pid)


def cold_start(run: Run, record: dict[str, Any], backend: Any, size: int) -> None:
    """From exec to a file's bytes in GPU memory, against restoring that process."""
    with tempfile.NamedTemporaryFile(prefix="kyb-weights-", dir="/var/tmp") as weights:
        block = os.urandom(64 << 20)
        for _ in range(size // len(block)):
            weights.write(block)
        weights.write(block[: size % len(block)])
        weights.flush()
        _read_through(weights.name)  # the page cache holds it, as on a node that has the model
        with Workload(size, source=weights.name) as work:
            run.cleanups.append(work.close)
            timings = work.ready["timings_s"]
            loaded = work.ready_s - timings["check"]  # exec to data on the GPU
            record.update({"bytes": size, "cold_start_s": round(loaded, 3),
                           "cold_timings_s": timings})
            backend.lock(work.pid, LOCK_TIMEOUT_MS)
            backend.checkpoint(work.pid)
            restore_s = timed(lambda: backend.restore(work.pid)) + timed(
                lambda: backend.unlock(work.pid))
            check = work.ask("check")
            record.update({
                "restore_s": round(restore_s, 3),
                "intact": bool(check["intact"]) and check["checksum"] == work.checksum,
                "cold_over_restore": round(loaded / restore_s, 2) if restore_s else None,
                "note": "process level: the CUDA restore of a checkpointed process whose host "
                        "memory stayed in place; the container part adds CRIU's restore"})


def gpu_tests(run: Run, record: dict[str, Any]) -> None:
    """tests/gpu, from the repository root; its summary and the tail of its output."""
    if importlib.util.find_spec("pytest") is None:
        record["status"] = "skipped: pytest is not installed (use --carry)"
        return
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs",
                           "tests/gpu"], cwd=REPO, capture_output=True, text=True,
                          timeout=max(10, run.left_s() - 5), check=False)
    lines = (done.stdout + done.stderr).strip().splitlines()
    record.update({"exit_code": done.returncode, "summary": lines[-1] if lines else "",
                   "output_tail": "\n".join(lines[-40:])})
    if done.returncode == 5:  # nothing ran: the module skipped itself, saying why
        record["status"] = f"skipped: {record['summary']}"
    elif done.returncode != 0:
        record["status"] = "failed"


def container(run: Run, record: dict[str, Any], size: int, libcuda_dir: str | None) -> None:
    from gpu_container import container_round_trip

    container_round_trip(run, record, size, libcuda_dir)


# -- helpers -----------------------------------------------------------------------------------


def _attempt(call: Callable[[], Any]) -> Any:
    try:
        value = call()
    except PartTimeout:
        raise
    except Exception as err:  # noqa: BLE001 - recorded in the results
        return {"error": f"{type(err).__name__}: {err}", "intact": False}
    return value if value is not None else {"ok": True}


def _tool_backend() -> Any:
    if shutil.which("cuda-checkpoint") is None:
        return None
    from kybernate.cuda.tool import CheckpointToolBackend

    return CheckpointToolBackend()


def _free(backend: Any, uuid: str) -> int:
    return next((g.memory_free for g in backend.gpus() if g.uuid == uuid), 0)


def _memory_total() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _first_lines(argv: list[str], count: int) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unavailable: {err}"
    return " | ".join((done.stdout or done.stderr).strip().splitlines()[:count])


def _host_memcpy_rate(size: int) -> float:
    source, target = ctypes.create_string_buffer(size), ctypes.create_string_buffer(size)
    ctypes.memmove(target, source, size)  # fault both in first
    best = min(timed(lambda: ctypes.memmove(target, source, size)) for _ in range(3))
    return round(size / GB / best, 3)


def _read_through(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--sizes-gb", default="1,4,16")
    parser.add_argument("--budget-s", type=float, default=480.0)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--carry", type=Path, help="folder bench/gpu_carry.sh prepared")
    parser.add_argument("--libcuda-dir", help="load libcuda.so.1 from here (tests' stand-in)")
    parser.add_argument("--cold-start-gb", type=float, default=4.0)
    args = parser.parse_args(argv)
    started = time.monotonic()

    if args.carry and CARRY_READY not in os.environ:
        python, env = install_carry(args.carry.resolve())
        print(f"carry unpacked into {env[CARRY_READY]}", flush=True)
        os.execve(python, [python, os.path.abspath(__file__), *sys.argv[1:]], env)
    if CARRY_READY in os.environ:  # the prefix goes when the run ends, however it ends
        prefix = os.environ[CARRY_READY]
        atexit.register(lambda: subprocess.run(["rm", "-rf", prefix], check=False))

    run = Run(args.out, args.budget_s)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown}; known: {', '.join(PARTS)}")
    sizes = [int(float(s) * GB) for s in args.sizes_gb.split(",") if s.strip()]
    run.doc["parameters"] = {"sizes_bytes": sizes, "parts": parts, "carry": str(args.carry),
                             "cold_start_gb": args.cold_start_gb}
    backend = None
    baseline: dict[str, Any] = {}
    with run.part("environment") as record:
        backend = environment(run, record, args.libcuda_dir)
    no_gpu = None if backend is not None else run.doc["parts"]["environment"].get(
        "gpu", "no GPU: the environment part failed")
    for name in parts:
        if name == "environment":
            continue
        if no_gpu is not None:
            run.doc["parts"][name] = {"status": no_gpu}
            continue
        with run.part(name) as record:
            if name == "bandwidth":
                baseline = bandwidth(run, record, 1 << 30)
            elif name == "roundtrip":
                roundtrip(run, record, backend, sizes, baseline)
            elif name == "remap":
                remap(run, record, backend)
            elif name == "cold_start":
                cold_start(run, record, backend, int(args.cold_start_gb * GB))
            elif name == "container":
                container(run, record, int(min(args.cold_start_gb, 2.0) * GB), args.libcuda_dir)
            elif name == "gpu_tests":
                gpu_tests(run, record)
    run.doc["seconds"] = round(time.monotonic() - started, 3)
    run.write()
    print(f"wrote {run.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
