"""Checkpoint and restore through containerd: Kybernate beside `io.containerd.runc.v2`.

    .venv/bin/python -m bench.checkpoint_bench [--sizes 64,512,2048] [--repeat 3] [--out DIR]

For each memory size, round after round (the runtimes' order alternating), a container
runs memhold (SIZE MiB of a seeded pattern, re-verified every second) beside a
heartbeat probe (bench/probes/heartbeat.c: wakes every 1 ms, logs every longer gap),
and the benchmark measures:

1. checkpoint: wall time of `ctr container checkpoint --task C REF` (containerd pauses
   the task before and resumes it after, for both runtimes; the task keeps running);
2. frozen time: the longest heartbeat gap inside that command, seen from inside the
   container, and the time the container's freezer cgroup was not THAWED, polled from
   outside every millisecond;
3. restore: after the task and container are removed, wall time of
   `ctr container restore --live C REF`, and the time until memhold verifies its
   pattern again (it keeps its round counter in memory: a restart would report round 1);
4. where Kybernate's time goes: the agent's phase timings from metadata.json, CRIU's
   dump and restore logs, the size of the checkpoint layer, and a replay of the
   agent's sha256 over the committed files.

The machine's memory-touch rate (memhold's fill of 1 GiB, bench/probes/touchrate.c) is
measured in the same run: it bounds how fast any dump or restore can go here.

Results: DIR/checkpoint-<UTC>.json and DIR/checkpoint-latest.json, and a table.
Everything created (containers, checkpoint images and content, the agent, the private
containerd, temporary directories) is removed however the run ends.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

from kybernate.sandbox.containerd import KYBERNATE_RUNTIME, Containerd
from kybernate.sandbox.images import build_oci_archive

from bench.common import (
    CONTAINER_TOOLS,
    RESULTS_DIR,
    FileKeeper,
    SchedTrace,
    Summary,
    Target,
    alternating,
    ctr_checked,
    interrupts_deferred,
    machine_info,
    parse_sizes,
    private_containerd_with_image,
    publish_results,
    ratio,
    read_sched_trace,
    remove_checkpoint_copies,
    remove_container,
    run_benchmark_main,
    sched_events_recorded,
    static_c_binary,
    thread_ids,
    utc_stamp,
)
from tests.support.agent import AgentProcess, running_agent
from tests.support.workloads import memhold_files

RUNC_RUNTIME = "io.containerd.runc.v2"
RUNTIMES = {"kybernate": KYBERNATE_RUNTIME, "runc": RUNC_RUNTIME}
IMAGE_REF = "docker.io/kybernate/checkpoint-bench:1"
CRIU_LAYER_MEDIA_TYPE = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
PROBES_DIR = Path(__file__).resolve().parent / "probes"
HEARTBEAT_THRESHOLD_US = 3000
TOUCH_RATE_MIB = 1024
# Targets, Kybernate over runc's path, medians of the same run.
CHECKPOINT_LIMIT = 1.1
RESTORE_LIMIT = 1.1
FROZEN_LIMIT = 1.0
HEARTBEAT_SUM_MIN_S = 0.010  # shorter gaps are scheduling noise on 2 shared cores


# ---- observing a container from outside ---------------------------------------------


class FreezerPoller:
    """Polls a v1 freezer cgroup's state every millisecond on a thread and keeps the
    intervals it was not THAWED (FREEZING or FROZEN)."""

    def __init__(self, state_file: Path, period_s: float = 0.001) -> None:
        self._state_file = state_file
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="freezer-poller", daemon=True)
        self.intervals: list[tuple[float, float]] = []
        self.polls = 0
        self.started_at = 0.0
        self.stopped_at = 0.0

    def __enter__(self) -> Self:
        self.started_at = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.stopped_at = time.monotonic()

    def _poll(self) -> None:
        frozen_since: float | None = None
        while not self._stop.is_set():
            try:
                state = self._state_file.read_text().strip()
            except OSError:
                state = "GONE"
            now = time.monotonic()
            self.polls += 1
            if state in ("FROZEN", "FREEZING"):
                if frozen_since is None:
                    frozen_since = now
            elif frozen_since is not None:
                self.intervals.append((frozen_since, now))
                frozen_since = None
            time.sleep(self._period_s)
        if frozen_since is not None:
            self.intervals.append((frozen_since, time.monotonic()))

    @property
    def mean_period_s(self) -> float | None:
        return (self.stopped_at - self.started_at) / self.polls if self.polls else None


class LogKeeper(FileKeeper):
    """Keeps the latest copy of CRIU's restore log while a restore runs: a failed
    restore's bundle (and the log in it) is deleted before ctr returns."""

    def __init__(self, candidates: Sequence[Path], period_s: float = 0.1) -> None:
        super().__init__(lambda: candidates, period_s, name="log-keeper")

    def errors(self, limit: int = 12) -> list[str]:
        """CRIU's error lines, and the log's last lines, of the latest copy."""
        lines = self.text.splitlines()
        return [line for line in lines if "Error" in line][:limit] + lines[-limit:]


def heartbeat_gaps(gaps_file: Path) -> list[tuple[float, float]]:
    """The heartbeat's logged gaps, as (from, to) seconds on CLOCK_MONOTONIC."""
    try:
        lines = gaps_file.read_text().splitlines()
    except FileNotFoundError:
        return []
    gaps = []
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            gaps.append((int(parts[0]) / 1e9, int(parts[1]) / 1e9))
    return gaps


def gaps_within(gaps: Sequence[tuple[float, float]], start: float, end: float) -> list[tuple[float, float]]:
    """Gaps that overlap [start, end]."""
    return [(a, b) for a, b in gaps if b >= start and a <= end]


def program_spans(trace: SchedTrace, ancestors: set[int], start: float, end: float) -> list[dict[str, Any]]:
    """Programs exec'd by our containerd or agent (not other sessions') in [start, end]
    on CLOCK_MONOTONIC: name, start offset and duration in seconds."""
    spans = []
    for span in trace.spans():
        if start <= span.exec_at <= end and trace.descends_from(span.pid, ancestors):
            spans.append({"program": Path(span.executable).name, "start_s": round(span.exec_at - start, 6),
                          "duration_s": None if span.seconds is None else round(span.seconds, 6)})
    return spans


def longest_run_of(spans: Sequence[dict[str, Any]], program: str) -> float | None:
    durations = [s["duration_s"] for s in spans if s["program"] == program and s["duration_s"] is not None]
    return max(durations, default=None)


# ---- the benchmark's world ---------------------------------------------------------------


@dataclass
class Bench:
    containerd: Containerd
    agent: AgentProcess
    heartbeat: Path
    workdir: Path

    def bundle(self, container_id: str) -> Path:
        return self.containerd.state / "io.containerd.runtime.v2.task" / self.containerd.namespace / container_id

    def rootfs_file(self, container_id: str, name: str) -> Path:
        return self.bundle(container_id) / "rootfs" / "tmp" / name

    def freezer_state_file(self, container_id: str) -> Path:
        return Path("/sys/fs/cgroup/freezer") / self.containerd.namespace / container_id / "freezer.state"

    def memhold_status(self, container_id: str) -> list[str]:
        try:
            return self.rootfs_file(container_id, "memhold").read_text().split()
        except OSError:
            return []

    def memhold_rounds(self, container_id: str) -> int:
        status = self.memhold_status(container_id)
        if status and status[0] == "BAD":
            raise RuntimeError(f"memhold in {container_id} found corrupted memory: {status}")
        return int(status[1]) if len(status) == 3 and status[0] == "ok" else 0

    def ctr(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        return ctr_checked(self.containerd, *args, timeout=timeout)

    def checkpoint_layer(self, image_ref: str) -> tuple[str, int] | None:
        """(digest, size) of the CRIU layer of a checkpoint image in the content store."""
        for line in self.ctr("images", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == image_ref:
                digest = next(f for f in fields if f.startswith("sha256:"))
                index = json.loads(self.ctr("content", "get", digest).stdout)
                for child in index.get("manifests", []):
                    if child.get("mediaType") == CRIU_LAYER_MEDIA_TYPE:
                        return str(child["digest"]), int(child["size"])
        return None

    def shim_phases_ms(self, container_id: str) -> dict[str, int]:
        """The Kybernate shim's "checkpoint of C: PHASE after N ms" lines (COMMITTED
        included, which metadata.json cannot hold), from this containerd's log."""
        pattern = re.compile(rf"checkpoint of {re.escape(container_id)}: ([A-Z_]+) after (\d+) ms")
        try:
            text = self.containerd.log_path.read_text(errors="replace")
        except OSError:
            return {}
        return {m[1].lower(): int(m[2]) for m in pattern.finditer(text)}

    def ancestors(self) -> set[int]:
        """Task ids whose descendants are ours: the threads of containerd, its shims,
        Kybernate's shim template and the agent, as they are when tracing starts
        (processes forked before the trace have no recorded parent)."""
        pids = {self.containerd.pid, *self.containerd.shim_pids(), *self.containerd.template_pids()}
        if self.agent.process is not None:
            pids.add(self.agent.process.pid)
        tasks: set[int] = set()
        for pid in pids:
            with contextlib.suppress(OSError):
                tasks |= thread_ids(pid)
        return tasks

    def committed_of(self, container_id: str) -> list[Path]:
        found = []
        for directory in self.agent.committed_checkpoints():
            with contextlib.suppress(OSError, ValueError):
                metadata = json.loads((directory / "metadata.json").read_text())
                if metadata.get("container", {}).get("id") == container_id:
                    found.append(directory)
        return found


def wait_for(what: str, condition: Callable[[], bool], timeout: float) -> float:
    """Poll every 20 ms until `condition`; returns when it held (monotonic)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic()


def sha256_seconds(directory: Path) -> tuple[float, int]:
    """Time a sha256 of every file under `directory` the way the agent's commit reads
    them (1 MiB chunks); returns (seconds, bytes)."""
    started, total = time.monotonic(), 0
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            digest = hashlib.sha256()
            with path.open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
                    total += len(chunk)
    return time.monotonic() - started, total


# ---- one measurement -----------------------------------------------------------------


@dataclass
class Sample:
    runtime: str
    size_mib: int
    round: int
    checkpoint_s: float | None = None
    restore_s: float | None = None
    restore_until_verified_s: float | None = None
    frozen_heartbeat_s: float | None = None
    longest_heartbeat_gap_s: float | None = None
    heartbeat_gaps_s: list[float] = field(default_factory=list)
    frozen_freezer_s: float | None = None
    freezer_longest_s: float | None = None
    freezer_intervals_s: list[float] = field(default_factory=list)
    freezer_poll_period_s: float | None = None
    checkpoint_layer_bytes: int | None = None
    pages_bytes: int | None = None
    criu_dump_s: float | None = None  # the criu process's run, exec to exit (perf sched trace)
    criu_restore_s: float | None = None
    agent_dump_s: float | None = None  # agent phases frozen -> dumped
    # From the trace: criu's exit to containerd's resume (`runc resume`): the agent's
    # commit and export (Kybernate), then containerd packing the images (both).
    criu_exit_to_resume_s: float | None = None
    # From `ctr container restore`'s start to `runc restore`'s exec: the shim's start
    # and, for Kybernate, the agent's verification (sha256 of every file).
    until_runc_restore_s: float | None = None
    agent_timings_ms: dict[str, int] | None = None
    # From the checkpoint command's return until the agent's commit was on disk.
    commit_after_return_s: float | None = None
    shim_phases_ms: dict[str, int] | None = None
    agent_sha256_replay_s: float | None = None
    rounds_before: int | None = None
    rounds_after: int | None = None
    checkpoint_programs: list[dict[str, Any]] = field(default_factory=list)
    restore_programs: list[dict[str, Any]] = field(default_factory=list)
    restore_log_lines: list[str] = field(default_factory=list)  # a failed restore's CRIU log
    error: str | None = None


def measure(bench: Bench, runtime: str, size_mib: int, round_index: int) -> Sample:
    sample = Sample(runtime=runtime, size_mib=size_mib, round=round_index)
    container_id = f"kyb-ckb-{runtime}-{size_mib}-{uuid.uuid4().hex[:6]}"
    checkpoint_ref = f"docker.io/kybernate/ckb-{container_id}:1"
    try:
        _checkpoint_and_restore(bench, sample, container_id, checkpoint_ref)
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired, OSError) as err:
        sample.error = str(err)
        print(f"  {runtime} {size_mib} MiB round {round_index}: FAILED: {err}", file=sys.stderr)
    finally:
        with interrupts_deferred():
            _remove_everything(bench, container_id, checkpoint_ref)
    return sample


def _checkpoint_and_restore(bench: Bench, sample: Sample, container_id: str, checkpoint_ref: str) -> None:
    annotations = (("--annotation", f"io.kybernate.agent-socket={bench.agent.socket}")
                   if sample.runtime == "kybernate" else ())
    workload = (f"/bin/heartbeat /tmp/gaps {HEARTBEAT_THRESHOLD_US} & "
                f"exec /bin/memhold {sample.size_mib} 7 /tmp/memhold")
    bench.ctr("run", "-d", "--runtime", RUNTIMES[sample.runtime], *annotations, IMAGE_REF, container_id,
              "sh", "-c", workload, timeout=60)
    wait_for(f"memhold in {container_id} to verify", lambda: bench.memhold_rounds(container_id) >= 1,
             timeout=120)

    recording = bench.workdir / f"sched-{container_id}.data"
    try:
        with sched_events_recorded(recording, clockid="CLOCK_MONOTONIC"):
            ancestors = bench.ancestors()
            windows = _timed_checkpoint_and_restore(bench, sample, container_id, checkpoint_ref)
        trace = read_sched_trace(recording)
    finally:
        recording.unlink(missing_ok=True)
    sample.checkpoint_programs = program_spans(trace, ancestors, *windows[0])
    sample.restore_programs = program_spans(trace, ancestors, *windows[1])
    sample.criu_dump_s = longest_run_of(sample.checkpoint_programs, "criu")
    sample.criu_restore_s = longest_run_of(sample.restore_programs, "criu")
    if sample.criu_dump_s is None:
        raise RuntimeError(f"no criu run of {container_id}'s checkpoint was traced")
    dump = next(x for x in sample.checkpoint_programs if x["program"] == "criu"
                and x["duration_s"] == sample.criu_dump_s)
    resumes = [x["start_s"] for x in sample.checkpoint_programs
               if x["program"] == "runc" and x["start_s"] > dump["start_s"] + dump["duration_s"]]
    if resumes:
        sample.criu_exit_to_resume_s = max(resumes) - (dump["start_s"] + dump["duration_s"])
    runc_restores = [x for x in sample.restore_programs if x["program"] == "runc" and x["duration_s"]]
    if runc_restores:
        sample.until_runc_restore_s = max(runc_restores, key=lambda x: x["duration_s"])["start_s"]


def _timed_checkpoint_and_restore(bench: Bench, sample: Sample, container_id: str,
                                  checkpoint_ref: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """The two ctr commands and what is observed around them; returns their windows."""
    # Checkpoint, leaving it running; the freezer polled from outside meanwhile.
    with FreezerPoller(bench.freezer_state_file(container_id)) as freezer:
        started = time.monotonic()
        bench.ctr("container", "checkpoint", "--task", container_id, checkpoint_ref)
        ended = time.monotonic()
        time.sleep(0.3)  # the heartbeat logs a gap once it runs again
    checkpoint_window = (started, ended)
    sample.checkpoint_s = ended - started
    gaps = gaps_within(heartbeat_gaps(bench.rootfs_file(container_id, "gaps")), started, ended)
    sample.heartbeat_gaps_s = [round(b - a, 6) for a, b in gaps]
    # Kybernate stops the tasks more than once (containerd's pause, the agent's own
    # freeze, the re-freeze for containerd's resume): the sum is what the workload lost.
    sample.frozen_heartbeat_s = sum(g for g in sample.heartbeat_gaps_s if g >= HEARTBEAT_SUM_MIN_S)
    sample.longest_heartbeat_gap_s = max(sample.heartbeat_gaps_s, default=0.0)
    frozen = gaps_within(freezer.intervals, started, ended + 0.3)
    sample.freezer_intervals_s = [round(b - a, 6) for a, b in frozen]
    sample.frozen_freezer_s = sum(sample.freezer_intervals_s)
    sample.freezer_longest_s = max(sample.freezer_intervals_s, default=0.0)
    sample.freezer_poll_period_s = freezer.mean_period_s
    if bench.containerd.task_status(container_id) != "RUNNING":
        raise RuntimeError(f"{container_id} is not running after its checkpoint")
    layer = bench.checkpoint_layer(checkpoint_ref)
    if layer is not None:
        sample.checkpoint_layer_bytes = layer[1]
    _record_dump_breakdown(bench, sample, container_id, ended)

    # Restore: the original goes first, as a migration would see it.
    sample.rounds_before = bench.memhold_rounds(container_id)
    remove_container(bench.containerd, container_id)
    bundle = bench.bundle(container_id)
    restore_logs = (bundle / "criu-restore" / "restore.log", bundle / "work" / "restore.log")
    with LogKeeper(restore_logs) as keeper:
        started = time.monotonic()
        try:
            bench.ctr("container", "restore", "--live", container_id, checkpoint_ref)
        except RuntimeError:
            time.sleep(0.2)  # the keeper's last look
            sample.restore_log_lines = keeper.errors()
            raise
    ended = time.monotonic()
    sample.restore_s = ended - started
    status = bench.containerd.task_status(container_id)
    if status != "RUNNING":
        raise RuntimeError(f"{container_id} is {status} after its restore, not RUNNING")
    # No --rw: the restored rootfs is fresh, so any status file is the restored memhold's.
    verified = wait_for(f"restored memhold in {container_id} to verify",
                        lambda: bench.memhold_rounds(container_id) >= max(1, sample.rounds_before or 1),
                        timeout=120)
    sample.restore_until_verified_s = verified - started
    sample.rounds_after = bench.memhold_rounds(container_id)
    return checkpoint_window, (started, ended)


def _record_dump_breakdown(bench: Bench, sample: Sample, container_id: str, checkpoint_ended: float) -> None:
    if sample.runtime == "kybernate":
        # Checkpoint returns once the images are in containerd's path; the agent's
        # own commit (fsync, metadata.json, seal) follows after containerd's resume.
        committed_at = wait_for(f"the agent's commit of {container_id}",
                                lambda: bool(bench.committed_of(container_id)), timeout=300)
        sample.commit_after_return_s = committed_at - checkpoint_ended
        committed = bench.committed_of(container_id)
        metadata = json.loads((committed[-1] / "metadata.json").read_text())
        timings = {k: int(v) for k, v in metadata.get("timings_ms", {}).items()}
        sample.agent_timings_ms = timings
        sample.pages_bytes = sum(entry["size"] for name, entry in metadata["files"].items()
                                 if Path(name).name.startswith("pages-"))
        if "frozen" in timings and "dumped" in timings:
            sample.agent_dump_s = (timings["dumped"] - timings["frozen"]) / 1000
        sample.agent_sha256_replay_s, _ = sha256_seconds(committed[-1])
        sample.shim_phases_ms = bench.shim_phases_ms(container_id)


def _remove_everything(bench: Bench, container_id: str, checkpoint_ref: str) -> None:
    """Container, checkpoint image (with its content, synchronously collected), the
    agent's committed copy and containerd's restore copy: a 2 GB checkpoint otherwise
    lives on in four places."""
    with contextlib.suppress(Exception):
        remove_container(bench.containerd, container_id)
    remove_checkpoint_copies(bench.containerd, checkpoint_ref, bench.committed_of(container_id))


# ---- the machine's memory-touch rate --------------------------------------------------------


def touch_rates(binary: Path, mib: int, runs: int) -> list[float]:
    """Bytes per second of memhold's fill of fresh memory, `runs` times."""
    rates = []
    for _ in range(runs):
        out = subprocess.run([str(binary), str(mib)], capture_output=True, text=True, check=True, timeout=120)
        rates.append(mib * 1024 * 1024 / float(out.stdout.strip()))
    return rates


# ---- summaries -------------------------------------------------------------------------------


METRICS = ("checkpoint_s", "restore_s", "restore_until_verified_s", "frozen_heartbeat_s",
           "frozen_freezer_s", "longest_heartbeat_gap_s", "criu_dump_s", "criu_restore_s",
           "criu_exit_to_resume_s", "until_runc_restore_s", "agent_dump_s", "agent_sha256_replay_s")


def summarise(samples: Sequence[Sample], sizes: Sequence[int], touch_rate: float) -> dict[str, Any]:
    per_size: dict[str, Any] = {}
    for size in sizes:
        entry: dict[str, Any] = {}
        for runtime in RUNTIMES:
            good = [s for s in samples if s.runtime == runtime and s.size_mib == size and s.error is None]
            stats: dict[str, Any] = {"count": len(good)}
            for metric in METRICS:
                values = [getattr(s, metric) for s in good if getattr(s, metric) is not None]
                if values:
                    stats[metric] = Summary.of(values).as_dict()
            # The same clock for both paths: the criu process's own run.
            throughputs = [s.checkpoint_layer_bytes / s.criu_dump_s for s in good
                           if s.checkpoint_layer_bytes and s.criu_dump_s]
            if throughputs:
                median = statistics.median(throughputs)
                stats["dump_bytes_per_s"] = median
                stats["dump_rate_over_touch_rate"] = median / touch_rate
            walls = [s.checkpoint_layer_bytes / s.checkpoint_s for s in good
                     if s.checkpoint_layer_bytes and s.checkpoint_s]
            if walls:
                stats["checkpoint_wall_bytes_per_s"] = statistics.median(walls)
                stats["checkpoint_wall_rate_over_touch_rate"] = statistics.median(walls) / touch_rate
            for key in ("agent_timings_ms", "shim_phases_ms"):
                records = [getattr(s, key) for s in good if getattr(s, key)]
                if records:
                    stats[f"{key}_median"] = {
                        name: statistics.median(r[name] for r in records if name in r) for name in records[0]}
            entry[runtime] = stats
        entry["ratios"] = {metric: _median_ratio(entry, metric) for metric in METRICS[:10]}
        entry["targets"] = [t.as_dict() for t in (
            Target("checkpoint wall, kybernate/runc median", CHECKPOINT_LIMIT, entry["ratios"]["checkpoint_s"]),
            Target("restore wall, kybernate/runc median", RESTORE_LIMIT, entry["ratios"]["restore_s"]),
            Target("frozen (heartbeat gaps summed), kybernate/runc median", FROZEN_LIMIT,
                   entry["ratios"]["frozen_heartbeat_s"]),
        )]
        per_size[str(size)] = entry
    return per_size


def _median_ratio(entry: dict[str, Any], metric: str) -> float | None:
    try:
        return ratio(entry["kybernate"][metric]["median"], entry["runc"][metric]["median"])
    except KeyError:
        return None


def print_table(per_size: dict[str, Any], touch_rate: float) -> None:
    """Medians in ms; `frozen` is the heartbeat's summed gaps, `longest` its longest,
    `freezer` the time the freezer cgroup was not THAWED, `criu-d`/`criu-r` the criu
    process's run in the dump/restore, `GB/s` the checkpoint layer over criu-d."""
    def ms(stats: dict[str, Any], metric: str) -> str:
        return f"{stats[metric]['median'] * 1000:8.0f}" if metric in stats else "       -"

    def x(value: float | None) -> str:
        return f"{value:7.2f}x" if value is not None else "       -"

    columns = ("checkpoint_s", "restore_s", "frozen_heartbeat_s", "longest_heartbeat_gap_s",
               "frozen_freezer_s", "criu_dump_s", "criu_restore_s")
    print(f"\nmemory-touch rate: {touch_rate / 1e9:.2f} GB/s (median); times are medians in ms")
    print(f"{'MiB':>5} {'runtime':<10} {'ckpt':>8} {'restore':>8} {'frozen':>8} {'longest':>8} "
          f"{'freezer':>8} {'criu-d':>8} {'criu-r':>8} {'GB/s':>6} {'/touch':>6}")
    for size, entry in per_size.items():
        for runtime in RUNTIMES:
            stats = entry[runtime]
            rate = stats.get("dump_bytes_per_s")
            print(f"{size:>5} {runtime:<10} {' '.join(ms(stats, c) for c in columns)} "
                  f"{(rate or 0) / 1e9:6.2f} {stats.get('dump_rate_over_touch_rate', 0):6.2f}")
        ratios = entry["ratios"]
        met = ", ".join(f"{t['name'].split(',')[0]} {'met' if t['met'] else 'MISSED' if t['met'] is False else '?'}"
                        for t in entry["targets"])
        print(f"{'':>5} {'kyb/runc':<10} {' '.join(x(ratios.get(c)) for c in columns)}")
        print(f"{'':>5} {'targets':<10} {met}")


# ---- the run ---------------------------------------------------------------------------------


@contextlib.contextmanager
def bench_world(workdir: Path) -> Iterator[Bench]:
    """Agent, private containerd with the benchmark image; all removed on the way out."""
    heartbeat = static_c_binary(PROBES_DIR / "heartbeat.c")
    archive = build_oci_archive(workdir / "bench-oci.tar", IMAGE_REF,
                                extra_files={**memhold_files(), "/bin/heartbeat": heartbeat.read_bytes()})
    # The agent's local tier under /tmp, like containerd's checkpoint temp dirs: one
    # filesystem, so the agent's export into containerd's path can hard-link.
    with running_agent(workdir, "bench") as agent, private_containerd_with_image(archive, IMAGE_REF) as containerd:
        yield Bench(containerd=containerd, agent=agent, heartbeat=heartbeat, workdir=workdir)


def run(sizes: Sequence[int], repeat: int, out_dir: Path) -> dict[str, Any]:
    stamp = utc_stamp()
    machine = machine_info(CONTAINER_TOOLS)
    touchrate = static_c_binary(PROBES_DIR / "touchrate.c")
    rates = touch_rates(touchrate, TOUCH_RATE_MIB, 3)
    samples: list[Sample] = []
    workdir = Path(tempfile.mkdtemp(prefix="kyb-ckb-", dir="/tmp"))
    try:
        with bench_world(workdir) as bench:
            for round_index in range(repeat):
                for size in sizes:
                    for runtime in alternating(list(RUNTIMES), round_index + sizes.index(size)):
                        sample = measure(bench, runtime, size, round_index)
                        samples.append(sample)
                        if sample.error is None:
                            print(f"  round {round_index} {size:>5} MiB {runtime:<9} checkpoint "
                                  f"{sample.checkpoint_s:.3f}s restore {sample.restore_s:.3f}s frozen "
                                  f"{sample.frozen_heartbeat_s:.3f}s (freezer {sample.frozen_freezer_s:.3f}s)",
                                  flush=True)
            agent_log_tail = bench.agent.log()[-3000:]
    finally:
        with interrupts_deferred():
            shutil.rmtree(workdir, ignore_errors=True)
    rates += touch_rates(touchrate, TOUCH_RATE_MIB, 2)  # again at the end: the load may have moved
    touch_rate = statistics.median(rates)
    per_size = summarise(samples, sizes, touch_rate)
    payload = {
        "benchmark": "checkpoint",
        "stamp": stamp,
        "machine": machine,
        "parameters": {"sizes_mib": list(sizes), "repeat": repeat, "runtimes": RUNTIMES,
                       "heartbeat_threshold_us": HEARTBEAT_THRESHOLD_US, "touch_rate_mib": TOUCH_RATE_MIB,
                       "checkpoint_command": "ctr container checkpoint --task C REF",
                       "restore_command": "ctr container restore --live C REF"},
        "memory_touch_rate": {"bytes_per_s_samples": rates, "bytes_per_s_median": touch_rate},
        "results": per_size,
        "samples": [asdict(s) for s in samples],
        "failures": [asdict(s) for s in samples if s.error is not None],
        "agent_log_tail": agent_log_tail if samples else "",
    }
    print_table(per_size, touch_rate)
    publish_results(out_dir, "checkpoint", payload, stamp)
    return payload


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.checkpoint_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,512,2048",
                        help="memhold sizes in MiB, comma-separated (default 64,512,2048)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per size and runtime (default 3)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    args = parser.parse_args(argv)
    args.sizes = parse_sizes(parser, args.sizes)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_benchmark_main(lambda: run(args.sizes, args.repeat, args.out))


if __name__ == "__main__":
    sys.exit(main())
