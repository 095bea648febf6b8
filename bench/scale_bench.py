"""Kybernate at scale, beside containerd's runc shim, in one run.

    .venv/bin/python -m bench.scale_bench [--containers 50] [--parallel 10]
                                          [--checkpoints 10] [--checkpoint-mib 256]
                                          [--budget-mib 768] [--out DIR]

1. **Starting many containers.** For each runtime (io.containerd.runc.v2, then
   io.containerd.kybernate.v1, or the other way round with --kybernate-first), N
   containers (`ctr run -d --runtime R IMAGE C sleep 600`), P of them at a time:
   each command's latency (p50, p90, p99, max), the throughput (N over the wall time
   of all), then with all N running the PSS of every serving shim of this containerd,
   Kybernate's forking template counted (PSS shares each page among its users, so the
   sum is what the shims really cost), and last the teardown (kill, delete, rm) timed
   the same way.
2. **Checkpointing many at once.** K Kybernate containers each hold M MiB (memhold,
   verified), then K checkpoints go to the node agent's gRPC API at once (leave
   running; what the shim asks for without the containerd round trip). Measured: each
   checkpoint's wall time and bytes, the aggregate throughput (all bytes over the wall
   time of all), and, sampled every 50 ms, the agent's RSS with its CRIU children and
   the machine's dirty + writeback page cache, against the agent's configured memory
   budget (`[checkpoint] memory_budget_bytes`; the default lets about three dumps run
   at once), and how many CRIU dumps ran at once. The disk's own write rate (1 GiB
   written and fsynced on the local tier's filesystem, before and after) is measured
   in the same run: the commit writes and fsyncs every byte, so that is its ceiling.

Results: DIR/scale-<UTC>.json and DIR/scale-latest.json. Everything created
(containers, shims, the agent, the private containerd, checkpoints, temporary
directories) is removed however the run ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import psutil
from kybernate.errors import KybernateError
from kybernate.sandbox.containerd import KYBERNATE_RUNTIME, Containerd
from kybernate.sandbox.images import build_oci_archive

from bench.common import (
    CONTAINER_TOOLS,
    RESULTS_DIR,
    Summary,
    ctr_checked,
    interrupts_deferred,
    machine_info,
    percentile,
    private_containerd_with_image,
    publish_results,
    ratio,
    read_process_memory,
    remove_container,
    run_benchmark_main,
    serving_shims,
    utc_stamp,
)
from tests.support.agent import AgentProcess, running_agent
from tests.support.workloads import memhold_files

RUNC_RUNTIME = "io.containerd.runc.v2"
SHORT = {RUNC_RUNTIME: "runc", KYBERNATE_RUNTIME: "kybernate"}
IMAGE_REF = "docker.io/kybernate/scale-bench:1"
DISK_PROBE_MIB = 1024
SAMPLE_PERIOD_S = 0.05


# ---- the world --------------------------------------------------------------------------------


@dataclass
class World:
    containerd: Containerd
    agent: AgentProcess
    workdir: Path
    budget_bytes: int

    def ctr(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        return ctr_checked(self.containerd, *args, timeout=timeout)

    def bundle(self, container_id: str) -> Path:
        return self.containerd.state / "io.containerd.runtime.v2.task" / self.containerd.namespace / container_id

    def task_pid(self, container_id: str) -> int:
        for line in self.ctr("task", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == container_id:
                return int(fields[1])
        raise RuntimeError(f"{container_id} has no task")


@contextlib.contextmanager
def scale_world(workdir: Path, budget_bytes: int) -> Iterator[World]:
    archive = build_oci_archive(workdir / "scale-oci.tar", IMAGE_REF, extra_files=memhold_files())
    with (running_agent(workdir, "scale", memory_budget_bytes=budget_bytes) as agent,
          private_containerd_with_image(archive, IMAGE_REF) as containerd):
        yield World(containerd=containerd, agent=agent, workdir=workdir, budget_bytes=budget_bytes)


# ---- 1. many containers -------------------------------------------------------------------------


def timed_in_parallel(commands: Sequence[Sequence[str]], world: World, parallel: int
                      ) -> tuple[float, list[float], list[str]]:
    """Run ctr commands P at a time; (wall seconds of all, each one's seconds, errors)."""
    def one(args: Sequence[str]) -> tuple[float, str | None]:
        started = time.monotonic()
        result = world.containerd.ctr(*args, timeout=300)
        error = None if result.returncode == 0 else (result.stderr.strip().splitlines() or ["?"])[-1]
        return time.monotonic() - started, error

    started = time.monotonic()
    with ThreadPoolExecutor(parallel) as pool:
        outcomes = list(pool.map(one, commands))
    wall = time.monotonic() - started
    return wall, [s for s, e in outcomes if e is None], [e for _, e in outcomes if e is not None]


def latency_summary(samples: Sequence[float]) -> dict[str, Any]:
    if not samples:
        return {}
    return {**Summary.of(samples).as_dict(), "p50": percentile(samples, 0.5),
            "p99": percentile(samples, 0.99), "samples": [round(s, 4) for s in samples]}


def shims_memory(world: World) -> dict[str, Any]:
    """PSS/RSS of every serving shim of our containerd, and of Kybernate's template."""
    shims = [read_process_memory(s.pid) for s in serving_shims(world.containerd)]
    templates = [read_process_memory(pid) for pid in world.containerd.template_pids()]
    pss = sum(m.pss for m in shims) + sum(m.pss for m in templates)
    return {"shims": len(shims), "templates": len(templates),
            "total_pss_bytes": pss, "total_rss_bytes": sum(m.rss for m in shims + templates),
            "template_pss_bytes": sum(m.pss for m in templates),
            "pss_per_container_bytes": pss / len(shims) if shims else None}


def many_containers(world: World, runtime: str, count: int, parallel: int) -> dict[str, Any]:
    name = SHORT[runtime]
    ids = [f"kyb-scale-{name}-{i:03d}-{uuid.uuid4().hex[:4]}" for i in range(count)]
    try:
        load = list(os.getloadavg())
        wall, latencies, errors = timed_in_parallel(
            [("run", "-d", "--runtime", runtime, IMAGE_REF, cid, "sleep", "600") for cid in ids], world, parallel)
        time.sleep(2.0)  # let every shim settle before its memory is read
        memory = shims_memory(world)
        teardown_wall, _teardown, teardown_errors = timed_in_parallel(
            [("task", "kill", "-s", "SIGKILL", cid) for cid in ids], world, parallel)
        time.sleep(1.0)
        delete_wall, deletes, delete_errors = timed_in_parallel(
            [("task", "delete", cid) for cid in ids], world, parallel)
        rm_wall, _, rm_errors = timed_in_parallel([("containers", "rm", cid) for cid in ids], world, parallel)
        result: dict[str, Any] = {
            "runtime": runtime, "containers": count, "parallel": parallel, "load_average": load,
            "start_wall_s": wall, "starts_per_s": len(latencies) / wall if wall else None,
            "start_latency_s": latency_summary(latencies), "start_errors": errors,
            "memory": memory,
            "task_delete_latency_s": latency_summary(deletes),
            "teardown_wall_s": teardown_wall + delete_wall + rm_wall,
            "teardown_errors": teardown_errors + delete_errors + rm_errors,
        }
        print(f"  {name:<9} {count} starts, {parallel} at a time: {result['starts_per_s']:.1f}/s, p50 "
              f"{result['start_latency_s'].get('p50', 0) * 1000:.0f} ms, p99 "
              f"{result['start_latency_s'].get('p99', 0) * 1000:.0f} ms; shim PSS "
              f"{memory['total_pss_bytes'] / 2**20:.1f} MiB ({len(errors)} errors)", flush=True)
        return result
    finally:
        remove_all(world, ids)


def remove_all(world: World, container_ids: Sequence[str]) -> None:
    with interrupts_deferred():
        for container_id in container_ids:
            with contextlib.suppress(Exception):
                remove_container(world.containerd, container_id)


# ---- 2. many checkpoints at once ---------------------------------------------------------------


def disk_write_rate(directory: Path, mib: int = DISK_PROBE_MIB) -> float:
    """Bytes per second writing `mib` MiB of incompressible data and fsyncing it."""
    chunk = os.urandom(1 << 20)
    path = directory / f".disk-probe-{os.getpid()}"
    try:
        started = time.monotonic()
        with path.open("wb") as f:
            for _ in range(mib):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        return mib * (1 << 20) / (time.monotonic() - started)
    finally:
        path.unlink(missing_ok=True)


@dataclass
class MemorySampler:
    """Samples the agent (with its children: the CRIU processes) and the machine's dirty
    page cache on a thread."""

    agent_pid: int
    period_s: float = SAMPLE_PERIOD_S
    peak_agent_rss: int = 0
    peak_agent_tree_rss: int = 0
    peak_dirty_writeback: int = 0
    baseline_dirty_writeback: int = 0
    peak_criu_processes: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self.baseline_dirty_writeback = dirty_writeback()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                agent = psutil.Process(self.agent_pid)
                rss = agent.memory_info().rss
                children = agent.children(recursive=True)
                tree = rss
                for child in children:
                    with contextlib.suppress(psutil.Error):
                        tree += child.memory_info().rss
                # a dump is one `criu swrk` child of the agent (its own helpers are grandchildren)
                criu = sum(1 for c in agent.children() if _name(c) == "criu")
                self.peak_agent_rss = max(self.peak_agent_rss, rss)
                self.peak_agent_tree_rss = max(self.peak_agent_tree_rss, tree)
                self.peak_criu_processes = max(self.peak_criu_processes, criu)
            self.peak_dirty_writeback = max(self.peak_dirty_writeback, dirty_writeback())
            self.samples += 1
            self._stop.wait(self.period_s)


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return ""


def dirty_writeback() -> int:
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            fields[name] = int(rest.split()[0]) * 1024
    return fields.get("Dirty", 0) + fields.get("Writeback", 0)


async def checkpoint_all(world: World, containers: Sequence[str]) -> list[dict[str, Any]]:
    from kybernate.api.client import AgentClient
    from kybernate.protos import agent_pb2

    runc_root = str(world.containerd.runc_root())

    async def one(container_id: str) -> dict[str, Any]:
        request = agent_pb2.CheckpointRequest(
            container_id=container_id, namespace=world.containerd.namespace,
            bundle=str(world.bundle(container_id)), runc_root=runc_root,
            init_pid=world.task_pid(container_id), name=f"{container_id}-scale", image_ref=IMAGE_REF,
            options=agent_pb2.CheckpointOptions(exit=False))
        started = time.monotonic()
        phases: dict[str, float] = {}
        error = None
        try:
            async with AgentClient(world.agent.socket) as client:
                async for progress in client.checkpoint(request, timeout=900):
                    phases[agent_pb2.Phase.Name(progress.phase).lower()] = round(time.monotonic() - started, 4)
        except (KybernateError, OSError) as err:  # recorded: one failure must not hide the others
            error = f"{type(err).__name__}: {err}"
        return {"container": container_id, "wall_s": time.monotonic() - started,
                "phases_s": phases, "error": error}

    return list(await asyncio.gather(*(one(c) for c in containers)))


def many_checkpoints(world: World, count: int, mib: int) -> dict[str, Any]:
    ids = [f"kyb-scale-ckpt-{i:02d}-{uuid.uuid4().hex[:4]}" for i in range(count)]
    try:
        for cid in ids:
            world.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME, IMAGE_REF, cid,
                      "/bin/memhold", str(mib), "7", "/tmp/memhold")
        deadline = time.monotonic() + 300
        for cid in ids:
            status = world.bundle(cid) / "rootfs" / "tmp" / "memhold"
            while not (status.exists() and status.read_text().startswith("ok")):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"memhold in {cid} never verified")
                time.sleep(0.1)
        tier = world.agent.local_tier
        tier.mkdir(parents=True, exist_ok=True)
        disk_before = disk_write_rate(tier)
        load = list(os.getloadavg())
        assert world.agent.process is not None
        with MemorySampler(world.agent.process.pid) as sampler:
            started = time.monotonic()
            outcomes = asyncio.run(checkpoint_all(world, ids))
            wall = time.monotonic() - started
        disk_after = disk_write_rate(tier)
        sizes = {}
        for directory in world.agent.committed_checkpoints():
            metadata = json.loads((directory / "metadata.json").read_text())
            sizes[metadata["container"]["id"]] = sum(int(e["size"]) for e in metadata["files"].values())
        for outcome in outcomes:
            outcome["bytes"] = sizes.get(outcome["container"])
        total = sum(b for b in sizes.values())
        disk_rate = (disk_before + disk_after) / 2
        result = {
            "checkpoints": count, "mib_each": mib, "load_average": load, "wall_s": wall,
            "committed": len(sizes), "bytes_total": total,
            "aggregate_bytes_per_s": total / wall if wall else None,
            "disk_write_bytes_per_s": {"before": disk_before, "after": disk_after, "mean": disk_rate},
            "aggregate_over_disk_rate": ratio(total / wall, disk_rate) if wall else None,
            "checkpoint_wall_s": latency_summary([o["wall_s"] for o in outcomes if not o["error"]]),
            "memory": {
                "budget_bytes": world.budget_bytes,
                "peak_agent_rss_bytes": sampler.peak_agent_rss,
                "peak_agent_with_criu_rss_bytes": sampler.peak_agent_tree_rss,
                "peak_agent_with_criu_over_budget": ratio(sampler.peak_agent_tree_rss, world.budget_bytes),
                "peak_dirty_writeback_bytes": sampler.peak_dirty_writeback,
                "baseline_dirty_writeback_bytes": sampler.baseline_dirty_writeback,
                "peak_concurrent_criu_processes": sampler.peak_criu_processes,
                "samples": sampler.samples,
            },
            "outcomes": outcomes,
        }
        print(f"  {count} checkpoints of {mib} MiB at once: {wall:.1f}s, "
              f"{total / wall / 1e6:.0f} MB/s aggregate vs disk {disk_rate / 1e6:.0f} MB/s; agent+CRIU peak RSS "
              f"{sampler.peak_agent_tree_rss / 2**20:.0f} MiB (budget {world.budget_bytes / 2**20:.0f} MiB), "
              f"at most {sampler.peak_criu_processes} CRIU at once", flush=True)
        return result
    finally:
        remove_all(world, ids)
        with interrupts_deferred():
            for directory in world.agent.committed_checkpoints():
                shutil.rmtree(directory, ignore_errors=True)


# ---- the run ---------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    stamp = utc_stamp()
    machine = machine_info(CONTAINER_TOOLS)
    workdir = Path(tempfile.mkdtemp(prefix="kyb-scale-", dir="/tmp"))
    starts: dict[str, Any] = {}
    checkpoints: dict[str, Any] = {}
    try:
        with scale_world(workdir, args.budget_mib << 20) as world:
            order = [KYBERNATE_RUNTIME, RUNC_RUNTIME] if args.kybernate_first else [RUNC_RUNTIME, KYBERNATE_RUNTIME]
            for runtime in order:
                starts[SHORT[runtime]] = many_containers(world, runtime, args.containers, args.parallel)
            if args.checkpoints:
                checkpoints = many_checkpoints(world, args.checkpoints, args.checkpoint_mib)
    finally:
        with interrupts_deferred():
            shutil.rmtree(workdir, ignore_errors=True)

    def median_ratio(key: str) -> float | None:
        try:
            return ratio(starts["kybernate"]["start_latency_s"][key], starts["runc"]["start_latency_s"][key])
        except (KeyError, TypeError):
            return None

    ratios = {
        "start_latency_p50": median_ratio("p50"), "start_latency_p99": median_ratio("p99"),
        "starts_per_s": ratio(starts.get("kybernate", {}).get("starts_per_s") or 0.0,
                              starts.get("runc", {}).get("starts_per_s") or 0.0),
        "total_pss": ratio(starts.get("kybernate", {}).get("memory", {}).get("total_pss_bytes", 0),
                           starts.get("runc", {}).get("memory", {}).get("total_pss_bytes", 0)),
    }
    payload = {
        "benchmark": "scale", "stamp": stamp,
        "machine": {**machine, "load_average_at_end": list(os.getloadavg())},
        "parameters": {"containers": args.containers, "parallel": args.parallel,
                       "checkpoints": args.checkpoints, "checkpoint_mib": args.checkpoint_mib,
                       "budget_mib": args.budget_mib, "disk_probe_mib": DISK_PROBE_MIB,
                       "start_command": "ctr run -d --runtime R IMAGE C sleep 600",
                       "checkpoint_call": "agent gRPC Checkpoint (leave running), all at once"},
        "starts": starts, "ratios_kybernate_over_runc": ratios, "checkpoints": checkpoints,
    }
    publish_results(args.out, "scale", payload, stamp)
    print(f"\nKybernate / runc: start p50 {ratios['start_latency_p50'] or float('nan'):.2f}x, "
          f"p99 {ratios['start_latency_p99'] or float('nan'):.2f}x, throughput "
          f"{ratios['starts_per_s'] or float('nan'):.2f}x, total shim PSS {ratios['total_pss'] or float('nan'):.2f}x")
    return payload


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.scale_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--containers", type=int, default=50, help="containers per runtime (default 50)")
    parser.add_argument("--parallel", type=int, default=10, help="ctr commands at a time (default 10)")
    parser.add_argument("--checkpoints", type=int, default=10,
                        help="concurrent checkpoints through the agent (default 10; 0 leaves them out)")
    parser.add_argument("--checkpoint-mib", type=int, default=256, help="memory of each (default 256)")
    parser.add_argument("--budget-mib", type=int, default=768,
                        help="the agent's memory budget for dumps in flight (default 768)")
    parser.add_argument("--kybernate-first", action="store_true", help="start Kybernate's containers first")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    args = parser.parse_args(argv)
    for name in ("containers", "parallel", "checkpoint_mib", "budget_mib"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.checkpoints < 0:
        parser.error("--checkpoints must not be negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_benchmark_main(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
