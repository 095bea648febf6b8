"""Helpers shared by the benchmarks: statistics, machine facts, results files, process
memory, interrupt-safe cleanup and a private containerd with the busybox test image.

Nothing here asserts on a measurement: benchmarks record, people judge.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Self

import psutil

from tests.support.containerd import Containerd, command_words
from tests.support.images import BUSYBOX_IMAGE_REF, build_oci_archive, import_image

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# ---- statistics ---------------------------------------------------------------------


def percentile(samples: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile (0..1) with linear interpolation between order statistics
    (numpy's default), so p90 of few samples still moves smoothly."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be within [0, 1], got {fraction}")
    ordered = sorted(samples)
    position = (len(ordered) - 1) * fraction
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Summary:
    count: int
    median: float
    mean: float
    p90: float
    min: float
    max: float
    stdev: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Summary:
        if not samples:
            raise ValueError("cannot summarise an empty sample")
        return cls(
            count=len(samples),
            median=statistics.median(samples),
            mean=statistics.fmean(samples),
            p90=percentile(samples, 0.9),
            min=min(samples),
            max=max(samples),
            stdev=statistics.stdev(samples) if len(samples) > 1 else 0.0,
        )

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, or None when the baseline is zero (nothing to compare)."""
    return None if denominator == 0 else numerator / denominator


@dataclass(frozen=True)
class Target:
    """An upper bound on a ratio to a baseline measured in the same run."""

    name: str
    limit: float
    value: float | None

    @property
    def met(self) -> bool | None:
        return None if self.value is None else self.value <= self.limit

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "limit": self.limit, "value": self.value, "met": self.met}


# ---- machine facts -----------------------------------------------------------------


def command_version(argv: Sequence[str]) -> str:
    """The first output line of a `--version`-style command, or why there is none."""
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=30,
                                check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unavailable: {err}"
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else f"unavailable: exit {result.returncode}, no output"


def machine_info(tools: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Kernel, CPUs, memory, Python and the versions of `tools` (name -> version argv)."""
    uname = platform.uname()
    return {
        "hostname": uname.node,
        "kernel": uname.release,
        "machine": uname.machine,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_bytes": psutil.virtual_memory().total,
        "load_average_at_start": list(os.getloadavg()),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "kybernate_install": kybernate_install(),
        "versions": {name: command_version(argv) for name, argv in tools.items()},
    }


def kybernate_install() -> str:
    """"wheel" when Kybernate is imported from site-packages, else "editable" (the
    source tree): an editable install puts an import finder in every interpreter's
    `site` (~16 ms per shim command here) that users of `pip install .` never pay, so
    shim timings compare only between runs of the same kind."""
    import kybernate

    return "wheel" if "site-packages" in Path(kybernate.__file__).parts else "editable"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


#: The container stack's versions, for machine_info.
CONTAINER_TOOLS: dict[str, Sequence[str]] = {
    "containerd": ["containerd", "--version"], "runc": ["runc", "--version"],
    "criu": ["criu", "--version"], "ctr": ["ctr", "--version"]}


def alternating(items: Sequence[str], turn: int) -> list[str]:
    """`items` in order on even turns, reversed on odd ones, so that drift of a shared
    machine hits every runtime alike."""
    return list(items) if turn % 2 == 0 else list(items)[::-1]


# ---- results files -----------------------------------------------------------------


def utc_stamp(moment: datetime.datetime | None = None) -> str:
    moment = moment or datetime.datetime.now(datetime.UTC)
    return moment.strftime("%Y%m%dT%H%M%SZ")


def write_json_atomically(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=False)
            f.write("\n")
        os.chmod(temporary, 0o644)  # mkstemp makes 0600; results are for everyone to read
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_results(out_dir: Path, prefix: str, payload: Mapping[str, Any],
                  stamp: str | None = None) -> tuple[Path, Path]:
    """Write `<prefix>-<UTC stamp>.json` and `<prefix>-latest.json`; return both paths."""
    stamped = out_dir / f"{prefix}-{stamp or utc_stamp()}.json"
    latest = out_dir / f"{prefix}-latest.json"
    write_json_atomically(stamped, payload)
    write_json_atomically(latest, payload)
    return stamped, latest


def publish_results(out_dir: Path, prefix: str, payload: Mapping[str, Any], stamp: str) -> None:
    """write_results, and say where they went."""
    stamped, latest = write_results(out_dir, prefix, payload, stamp)
    print(f"\nwrote {stamped} and {latest}")


# ---- process memory ----------------------------------------------------------------


@dataclass(frozen=True)
class ProcessMemory:
    """One process's memory as the kernel accounts it (bytes), and its thread count.

    PSS splits every shared page among the processes mapping it, so N copies of one
    shim sum to what they really cost; RSS counts shared pages in full for each.
    """

    pid: int
    rss: int
    pss: int
    uss: int  # private clean + private dirty: what killing the process would free
    swap: int
    threads: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def read_smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup as {field: bytes} (the kernel writes kB)."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[name.strip()] = int(parts[0]) * 1024
    if "Rss" not in fields:
        raise ValueError(f"/proc/{pid}/smaps_rollup has no Rss line")
    return fields


def read_thread_count(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise ValueError(f"/proc/{pid}/status has no Threads line")


def read_process_memory(pid: int) -> ProcessMemory:
    rollup = read_smaps_rollup(pid)
    return ProcessMemory(
        pid=pid,
        rss=rollup["Rss"],
        pss=rollup.get("Pss", 0),
        uss=rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0),
        swap=rollup.get("Swap", 0),
        threads=read_thread_count(pid),
    )


def read_cmdline(pid: int) -> list[str]:
    """The process's arguments, or the words of its title (a serving shim's)."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [word.decode(errors="replace") for word in command_words(f.read())]


def descendants(pid: int) -> list[int]:
    """Every live descendant of pid (children, grandchildren, ...)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    return []


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of a Go-style `-flag value` / `-flag=value` in argv, if present."""
    for index, arg in enumerate(argv):
        for spelling in (f"-{flag}", f"--{flag}"):
            if arg == spelling and index + 1 < len(argv):
                return argv[index + 1]
            if arg.startswith(spelling + "="):
                return arg.split("=", 1)[1]
    return None


# ---- process timelines from the scheduler's trace events -----------------------------

SCHED_EVENTS = ("sched:sched_process_fork", "sched:sched_process_exec", "sched:sched_process_exit")
PERF_SCRIPT_LINE = re.compile(
    r"^\s*.+?\s+(?P<tid>\d+)\s+\[\d+\]\s+(?P<at>\d+\.\d+):\s+sched:(?P<event>\w+):\s+(?P<rest>.*)$")


@dataclass(frozen=True)
class ProcessSpan:
    """One program run seen in a trace: from its exec to the exit of its last thread
    (seconds on perf's clock), and the process that forked it."""

    pid: int
    parent: int | None
    executable: str
    exec_at: float
    exit_at: float | None

    @property
    def seconds(self) -> float | None:
        return None if self.exit_at is None else self.exit_at - self.exec_at


@dataclass
class SchedTrace:
    """fork, exec and exit events of every task, from `perf script` text.

    Forks name threads and processes alike (a thread is a forked task that never
    execs), so every question about a process walks threads back to their process."""

    forked_by: dict[int, int]
    execs: dict[int, tuple[float, str]]
    exits: dict[int, float]

    @classmethod
    def parse(cls, text: str) -> SchedTrace:
        forked_by: dict[int, int] = {}
        execs: dict[int, tuple[float, str]] = {}
        exits: dict[int, float] = {}
        for line in text.splitlines():
            match = PERF_SCRIPT_LINE.match(line)
            if match is None:
                continue
            tid, at, event, rest = (int(match["tid"]), float(match["at"]), match["event"],
                                    match["rest"])
            fields = dict(part.split("=", 1) for part in rest.split() if "=" in part)
            if event == "sched_process_fork" and "child_pid" in fields:
                forked_by[int(fields["child_pid"])] = tid
            elif event == "sched_process_exec" and "filename" in fields:
                execs[tid] = (at, fields["filename"])
            elif event == "sched_process_exit":
                exits[tid] = at
        return cls(forked_by, execs, exits)

    def process_of(self, tid: int) -> int:
        """The process a task belongs to: threads (never exec'd) lead to their creator."""
        seen = set()
        while tid not in self.execs and tid in self.forked_by and tid not in seen:
            seen.add(tid)
            tid = self.forked_by[tid]
        return tid

    def _threads_of(self, pid: int) -> list[int]:
        return [tid for tid in self.forked_by
                if tid not in self.execs and self.process_of(tid) == pid]

    def spans(self) -> list[ProcessSpan]:
        """Every exec'd program, in exec order."""
        found = []
        for pid, (at, executable) in self.execs.items():
            exit_times = [self.exits[t] for t in [pid, *self._threads_of(pid)] if t in self.exits]
            parent = self.forked_by.get(pid)
            found.append(ProcessSpan(
                pid=pid, parent=None if parent is None else self.process_of(parent),
                executable=executable, exec_at=at,
                exit_at=max(exit_times) if pid in self.exits and exit_times else None))
        return sorted(found, key=lambda span: span.exec_at)

    def descends_from(self, pid: int, ancestors: set[int]) -> bool:
        seen = set()
        while pid not in ancestors:
            if pid in seen or pid not in self.forked_by:
                return False
            seen.add(pid)
            pid = self.forked_by[pid]
        return True


@contextlib.contextmanager
def sched_events_recorded(output: Path, start_wait: float = 1.0,
                          clockid: str | None = None) -> Iterator[Path]:
    """Record every task's fork, exec and exit system-wide with `perf record` while
    the block runs (tracepoints, no ptrace: the traced programs run at full speed).
    `clockid` (e.g. "CLOCK_MONOTONIC") stamps events on that clock instead of perf's
    own, so they line up with time.monotonic()."""
    recorder = subprocess.Popen(
        ["perf", "record", "-q", "-a", "-o", str(output), *(("-k", clockid) if clockid else ()),
         *(arg for event in SCHED_EVENTS for arg in ("-e", event))],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(start_wait)  # perf opens its ring buffers before it records anything
        if recorder.poll() is not None:
            error = recorder.stderr.read().decode(errors="replace") if recorder.stderr else ""
            raise RuntimeError(f"perf record exited at start: {error.strip()}")
        yield output
    finally:
        if recorder.poll() is None:
            recorder.send_signal(signal.SIGINT)
            try:
                recorder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait()
        if recorder.stderr:
            recorder.stderr.close()


def read_sched_trace(recording: Path) -> SchedTrace:
    result = subprocess.run(["perf", "script", "-i", str(recording)], capture_output=True,
                            text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"perf script failed: {result.stderr.strip()}")
    return SchedTrace.parse(result.stdout)


def thread_ids(pid: int) -> set[int]:
    """The ids of a live process's threads (a Go daemon forks from any of them)."""
    return {int(tid) for tid in os.listdir(f"/proc/{pid}/task")}



# ---- small static probes -------------------------------------------------------------


def static_c_binary(source: Path, cache_dir: Path | None = None) -> Path:
    """Compile a one-file C probe statically (so it runs in a busybox rootfs), once per
    source version, and return the binary's path."""
    text = source.read_bytes()
    digest = hashlib.sha256(text).hexdigest()[:12]
    cache = cache_dir or Path(tempfile.gettempdir()) / "kybernate-bench-probes"
    cache.mkdir(parents=True, exist_ok=True)
    binary = cache / f"{source.stem}-{digest}"
    if binary.exists():
        return binary
    partial = cache / f".{source.stem}-{digest}.{os.getpid()}"
    result = subprocess.run(["gcc", "-O2", "-static", "-Wall", "-o", str(partial), str(source)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"compiling {source} failed: {result.stderr.strip()}")
    partial.rename(binary)
    return binary


# ---- interrupts --------------------------------------------------------------------


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt like Ctrl-C does, so every `finally`
    (container removal, containerd shutdown) runs whichever way the run is stopped."""
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[list[int]]:
    """Hold off Ctrl-C and SIGTERM while cleanup runs (a second Ctrl-C must not leave
    a half-removed containerd behind); the signals received are listed, then raised
    as KeyboardInterrupt once cleanup is done."""
    received: list[int] = []
    watched = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum))
                for sig in watched}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt(f"signal {signal.Signals(received[0]).name} during cleanup")


# ---- a private containerd with the test image ---------------------------------------


@dataclass(frozen=True)
class ShimProcess:
    """A long-lived shim process of one containerd, and the container it serves."""

    pid: int
    container_id: str
    argv: tuple[str, ...]


def serving_shims(containerd: Containerd) -> list[ShimProcess]:
    """The serving shim processes of this containerd (one per container or group).

    containerd's shims carry `-address <containerd socket>` on their command line,
    which is how Containerd.shim_pids() tells ours from other sessions'. A shim binary
    briefly runs as its own `start`/`delete` command too; those are not servers: the
    runc shim's `start` re-executes itself without an action, and Kybernate's serving
    process is `python -m kybernate.shim ... serve`, titled as Go shims are
    (`containerd-shim-kybernate-v1 -namespace NS -id ID -address ADDR`).
    """
    found = []
    for pid in containerd.shim_pids():
        try:
            argv = read_cmdline(pid)
        except OSError:
            continue  # exited since it was listed
        action = argv[-1] if argv else ""
        if action in ("start", "delete"):
            continue
        container_id = flag_value(argv, "id")
        if container_id is None:
            continue
        found.append(ShimProcess(pid=pid, container_id=container_id, argv=tuple(argv)))
    return found


@contextlib.contextmanager
def private_containerd_with_image(archive: Path, ref: str,
                                  containerd: Containerd | None = None) -> Iterator[Containerd]:
    """A started private containerd (or the given, unstarted one) with the OCI archive
    imported as `ref`; stopped, with every container and shim of it, however the block
    ends (Ctrl-C included)."""
    containerd = containerd or Containerd()
    try:
        containerd.start()
        import_image(containerd, archive, ref)
        yield containerd
    finally:
        with interrupts_deferred():
            leftovers = containerd.stop()
        if leftovers:
            print(f"cleanup removed by force: {', '.join(leftovers)}", file=sys.stderr)


@contextlib.contextmanager
def private_containerd_with_busybox() -> Iterator[tuple[Containerd, str]]:
    """A private containerd with the busybox test image imported; yields it and the
    image reference."""
    with tempfile.TemporaryDirectory(prefix="kyb-bench-img-") as scratch:
        archive = build_oci_archive(Path(scratch) / "busybox-oci.tar")
        with private_containerd_with_image(archive, BUSYBOX_IMAGE_REF) as containerd:
            yield containerd, BUSYBOX_IMAGE_REF


def ctr_checked(containerd: Containerd, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """ctr against our containerd; a failure raises RuntimeError with ctr's last line."""
    result = containerd.ctr(*args, timeout=timeout)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"ctr {' '.join(args[:3])} failed ({result.returncode}): {last}")
    return result


def remove_checkpoint_copies(containerd: Containerd, checkpoint_ref: str,
                             directories: Iterable[Path] = ()) -> None:
    """A checkpoint's image (its content collected at once), the given directories (the
    agents' committed copies) and containerd's unpacked restore copies: containerd 1.7
    unpacks a checkpoint into XDG_RUNTIME_DIR for a restore and never removes it (ours
    points into the private containerd's base, and nothing else restores there
    meanwhile). A 2 GB checkpoint otherwise lives on in every one of these places."""
    with contextlib.suppress(Exception):
        containerd.ctr("images", "rm", "--sync", checkpoint_ref, timeout=300)
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)
    with contextlib.suppress(OSError):
        for leftover in containerd.runtime_dir.glob("ctrd-checkpoint*"):
            shutil.rmtree(leftover, ignore_errors=True)


def remove_container(containerd: Containerd, container_id: str) -> None:
    """Best effort: kill and delete the task, then the container (either may be gone)."""
    if containerd.task_status(container_id) is not None:
        containerd.ctr("task", "kill", "-s", "SIGKILL", "--all", container_id, timeout=30)
        containerd.ctr("task", "delete", "--force", container_id, timeout=30)
    containerd.ctr("containers", "rm", container_id, timeout=30)


# ---- files that vanish, and the command line ---------------------------------------------


class FileKeeper:
    """Keeps the longest text seen of the files `paths()` names, polled on a thread
    while a command runs: CRIU's logs live in directories that the command itself may
    remove before it returns (a failed restore's bundle, the agent's work directory of
    a committed checkpoint)."""

    def __init__(self, paths: Callable[[], Iterable[Path]], period_s: float = 0.05,
                 name: str = "file-keeper") -> None:
        self._paths = paths
        self._period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name=name, daemon=True)
        self.text = ""

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._look()

    def _keep(self) -> None:
        while not self._stop.wait(self._period_s):
            self._look()

    def _look(self) -> None:
        with contextlib.suppress(OSError):
            for path in self._paths():
                with contextlib.suppress(OSError):
                    text = path.read_text(errors="replace")
                    if len(text) >= len(self.text):
                        self.text = text


def parse_sizes(parser: argparse.ArgumentParser, text: str, option: str = "--sizes") -> list[int]:
    """Comma-separated positive integers, or the parser's usage error."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        parser.error(f"{option} must be comma-separated integers, got {text!r}")
    if not sizes or any(s <= 0 for s in sizes):
        parser.error(f"{option} needs positive sizes")
    return sizes


def run_benchmark_main(run: Callable[[], object]) -> int:
    """Run a benchmark with SIGTERM and SIGHUP treated as Ctrl-C; its cleanup has run
    by the time an interrupt is reported (exit 130)."""
    with termination_as_interrupt():
        try:
            run()
        except KeyboardInterrupt as interrupt:
            print(f"interrupted ({interrupt}); everything was cleaned up", file=sys.stderr)
            return 130
    return 0


__all__ = [
    "BUSYBOX_IMAGE_REF",
    "CONTAINER_TOOLS",
    "RESULTS_DIR",
    "FileKeeper",
    "ProcessMemory",
    "ProcessSpan",
    "SchedTrace",
    "ShimProcess",
    "Summary",
    "Target",
    "alternating",
    "command_version",
    "ctr_checked",
    "descendants",
    "flag_value",
    "interrupts_deferred",
    "machine_info",
    "parse_sizes",
    "percentile",
    "private_containerd_with_busybox",
    "private_containerd_with_image",
    "publish_results",
    "ratio",
    "read_cmdline",
    "read_process_memory",
    "read_sched_trace",
    "read_smaps_rollup",
    "read_thread_count",
    "remove_checkpoint_copies",
    "remove_container",
    "run_benchmark_main",
    "sched_events_recorded",
    "serving_shims",
    "static_c_binary",
    "termination_as_interrupt",
    "thread_ids",
    "utc_stamp",
    "write_json_atomically",
    "write_results",
]
