"""Speed and memory of Kybernate's shim beside containerd's stock runc shim, in one run.

    .venv/bin/python -m bench.shim_bench [--runs N] [--containers N] [--out DIR]

Against a private containerd (its own root, state, sockets and namespace) with the
busybox test image, for io.containerd.runc.v2 (the baseline) and
io.containerd.kybernate.v1:

1. latency: wall time of `ctr run --rm --runtime R IMAGE ID /bin/true`; two warm-up runs
   per runtime, then N rounds, each running every runtime once, in an order that
   alternates round by round, so drift of this shared VM hits both alike;
2. memory: with M containers running `sleep 600` per runtime (one runtime at a time),
   PSS, RSS, USS and threads of each serving shim process, from /proc/PID/smaps_rollup;
3. entry cost: wall time of each shim binary's `-v`, and `python -X importtime` of the
   modules Kybernate's `start`, `delete` and `serve` commands load.

Results go to DIR/shim-<UTC stamp>.json and DIR/shim-latest.json, with the ratios
Kybernate/runc and the issues' targets (latency <= 1.15x, PSS per shim <= 1.5x, PSS
per container with the template <= 1.25x). Everything the
run created is removed however it ends, Ctrl-C included. Nothing here asserts on a
timing: a benchmark records, it does not judge.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    ProcessMemory,
    ProcessSpan,
    SchedTrace,
    Summary,
    Target,
    descendants,
    machine_info,
    private_containerd_with_busybox,
    ratio,
    read_cmdline,
    read_process_memory,
    read_sched_trace,
    remove_container,
    sched_events_recorded,
    serving_shims,
    termination_as_interrupt,
    thread_ids,
    utc_stamp,
    write_results,
)
from tests.support.containerd import Containerd

RUNC = "io.containerd.runc.v2"
KYBERNATE = "io.containerd.kybernate.v1"
RUNTIMES = (RUNC, KYBERNATE)
SHORT_NAMES = {RUNC: "runc", KYBERNATE: "kyb"}

LATENCY_TARGET = 1.15  # issue 9: median `ctr run --rm` at most 1.15x runc's (issue 2 had 1.25x)
PSS_TARGET = 1.5  # issue 2: median shim PSS at most 1.5x runc's
PSS_PER_CONTAINER_TARGET = 1.25  # issue 9: PSS per container, the template counted
MINIMUM_RUNS = 20  # issue 2: at least this many timed runs per runtime

SHIM_BINARIES = {RUNC: "containerd-shim-runc-v2", KYBERNATE: "containerd-shim-kybernate-v1"}
# What each of Kybernate's commands imports beyond its entry module, lazy imports included.
KYBERNATE_COMMAND_MODULES = {
    # containerd's command process when a template runs: the entry and the relay (relay.py).
    "relayed": ("kybernate.shim.relay",),
    "start": ("kybernate.shim.start",),
    "delete": ("kybernate.shim.delete", "kybernate.shim.start", "kybernate.runtime.mount"),
    "serve": ("kybernate.shim.server", "kybernate.runtime.reaper", "kybernate.shim.events",
              "kybernate.shim.service", "kybernate.shim.ttrpc"),
}
# Printed by a fresh interpreter after its imports: what they cost in memory.
MEMORY_PROBE = (
    "import sys\n"
    "fields = {}\n"
    "for line in open('/proc/self/smaps_rollup'):\n"
    "    name, _, rest = line.partition(':')\n"
    "    parts = rest.split()\n"
    "    if len(parts) == 2: fields[name] = int(parts[0]) * 1024\n"
    "print(fields['Rss'], fields['Private_Clean'] + fields['Private_Dirty'], len(sys.modules))\n"
)
CONTAINER_COMMAND = ("sleep", "600")


# ---- 1. latency ---------------------------------------------------------------------


@dataclass(frozen=True)
class RunOutcome:
    runtime: str
    container_id: str
    seconds: float
    ok: bool
    error: str = ""


def time_one_run(containerd: Containerd, image: str, runtime: str, container_id: str) -> RunOutcome:
    started = time.perf_counter()
    result = containerd.ctr("run", "--rm", "--runtime", runtime, image, container_id, "/bin/true",
                            timeout=120)
    seconds = time.perf_counter() - started
    if result.returncode == 0:
        return RunOutcome(runtime, container_id, seconds, ok=True)
    # A failed `run --rm` can leave its container behind; the next id is fresh anyway.
    remove_container(containerd, container_id)
    error = (result.stderr or result.stdout).strip().splitlines()
    return RunOutcome(runtime, container_id, seconds, ok=False,
                      error=error[-1] if error else f"exit {result.returncode}")


def round_order(round_index: int, runtimes: Sequence[str]) -> list[str]:
    """Every runtime once per round; who goes first alternates, so neither always runs
    right after the other's teardown."""
    return list(runtimes) if round_index % 2 == 0 else list(reversed(runtimes))


def measure_latency(containerd: Containerd, image: str, runtimes: Sequence[str], runs: int,
                    warmups: int, run_tag: str) -> dict[str, Any]:
    outcomes: dict[str, list[RunOutcome]] = {runtime: [] for runtime in runtimes}
    warmup_outcomes: dict[str, list[RunOutcome]] = {runtime: [] for runtime in runtimes}
    for index in range(warmups):
        for runtime in round_order(index, runtimes):
            container_id = f"{run_tag}-warm-{SHORT_NAMES[runtime]}-{index}"
            warmup_outcomes[runtime].append(time_one_run(containerd, image, runtime, container_id))
    for index in range(runs):
        for runtime in round_order(index, runtimes):
            container_id = f"{run_tag}-{SHORT_NAMES[runtime]}-{index}"
            outcome = time_one_run(containerd, image, runtime, container_id)
            outcomes[runtime].append(outcome)
            mark = f"{outcome.seconds * 1000:7.1f} ms" if outcome.ok else f"FAILED: {outcome.error}"
            print(f"  round {index + 1:>3}/{runs} {SHORT_NAMES[runtime]:>4}: {mark}", flush=True)

    report: dict[str, Any] = {}
    for runtime in runtimes:
        samples_ms = [o.seconds * 1000 for o in outcomes[runtime] if o.ok]
        report[runtime] = {
            "samples_ms": samples_ms,
            "warmup_ms": [o.seconds * 1000 for o in warmup_outcomes[runtime]],
            "failures": [{"container_id": o.container_id, "error": o.error}
                         for o in outcomes[runtime] + warmup_outcomes[runtime] if not o.ok],
            "summary_ms": Summary.of(samples_ms).as_dict() if samples_ms else None,
        }
    return report


# ---- 2. memory ----------------------------------------------------------------------


def start_sleepers(containerd: Containerd, image: str, runtime: str, container_ids: Sequence[str]) -> None:
    for container_id in container_ids:
        containerd.ctr("run", "-d", "--runtime", runtime, image, container_id, *CONTAINER_COMMAND,
                       timeout=120, check=True)
    for container_id in container_ids:
        containerd.wait_task_status(container_id, "RUNNING", timeout=60)


def helper_processes(shim_pid: int) -> list[ProcessMemory]:
    """Descendants of a shim that are not the container's own process: the shim's
    cost includes them (none are expected for either runtime)."""
    helpers = []
    for pid in descendants(shim_pid):
        try:
            if tuple(read_cmdline(pid)) == CONTAINER_COMMAND:
                continue
            helpers.append(read_process_memory(pid))
        except OSError:
            continue
    return helpers


def measure_memory(containerd: Containerd, image: str, runtime: str, containers: int,
                   settle_seconds: float, run_tag: str) -> dict[str, Any]:
    container_ids = [f"{run_tag}-mem-{SHORT_NAMES[runtime]}-{n}" for n in range(containers)]
    try:
        start_sleepers(containerd, image, runtime, container_ids)
        time.sleep(settle_seconds)  # let lazy start-up work finish before reading memory
        wanted = set(container_ids)
        shims = [s for s in serving_shims(containerd) if s.container_id in wanted]
        per_shim: list[dict[str, Any]] = []
        for shim in sorted(shims, key=lambda s: s.container_id):
            memory = read_process_memory(shim.pid)
            helpers = helper_processes(shim.pid)
            per_shim.append({
                "container_id": shim.container_id,
                "argv": list(shim.argv),
                **memory.as_dict(),
                "helpers": [h.as_dict() for h in helpers],
            })
        # Kybernate's forked shims share pages with their template, so its PSS is part of
        # what these containers cost: read it while they run, and count it per container.
        templates = ([read_process_memory(pid).as_dict() for pid in containerd.template_pids()]
                     if runtime == KYBERNATE else [])
    finally:
        for container_id in container_ids:
            remove_container(containerd, container_id)
    report: dict[str, Any] = {
        "containers": containers,
        "shim_processes": len(per_shim),
        "per_shim": per_shim,
    }
    if per_shim:
        for key in ("pss", "rss", "uss", "threads"):
            summary = Summary.of([float(entry[key]) for entry in per_shim])
            report[key] = {"median": summary.median, "mean": summary.mean,
                           "min": summary.min, "max": summary.max}
        report["total_pss"] = sum(entry["pss"] for entry in per_shim)
        report["helper_processes"] = sum(len(entry["helpers"]) for entry in per_shim)
        template_pss = sum(t["pss"] for t in templates)
        report["templates"] = templates
        report["total_pss_with_template"] = report["total_pss"] + template_pss
        report["pss_per_container_with_template"] = report["total_pss_with_template"] / len(per_shim)
    return report


# ---- 3. entry cost ------------------------------------------------------------------


IMPORTTIME_LINE = re.compile(r"^import time:\s+(\d+)\s*\|\s*(\d+)\s*\|(\s*)(\S+)\s*$")


def parse_importtime(stderr: str) -> list[dict[str, Any]]:
    """`-X importtime` lines as {module, self_ms, cumulative_ms, depth}, in load order."""
    entries = []
    for line in stderr.splitlines():
        match = IMPORTTIME_LINE.match(line)
        if match is None:
            continue
        self_us, cumulative_us, indent, module = match.groups()
        entries.append({"module": module, "self_ms": int(self_us) / 1000,
                        "cumulative_ms": int(cumulative_us) / 1000,
                        "depth": max(0, (len(indent) - 1) // 2)})
    return entries


def import_profile(modules: Sequence[str], repeats: int) -> dict[str, Any]:
    """Import cost of `kybernate.shim.main` plus `modules` in a fresh interpreter run as
    the shim runs (-I): time (the run with the median total of `repeats`), the imports
    costing the most, and the interpreter's RSS and private memory afterwards."""
    statement = "import " + ", ".join(["kybernate.shim.main", *modules])
    runs = []
    for _ in range(repeats):
        result = subprocess.run(
            [sys.executable, "-I", "-X", "importtime", "-c", statement],
            capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            return {"modules": list(modules), "error": result.stderr.strip().splitlines()[-1:]}
        entries = parse_importtime(result.stderr)
        total = sum(e["cumulative_ms"] for e in entries if e["depth"] == 0)
        runs.append((total, entries))
    runs.sort(key=lambda run: run[0])
    total, entries = runs[len(runs) // 2]
    heaviest = sorted(entries, key=lambda e: e["cumulative_ms"], reverse=True)
    return {
        "modules": list(modules),
        "total_import_ms": total,
        "memory_after_import": memory_after(statement),
        "totals_ms": [run[0] for run in runs],
        "heaviest": [e for e in heaviest if e["cumulative_ms"] >= 2.0][:25],
    }


def memory_after(statement: str) -> dict[str, int] | str:
    """RSS, private bytes and module count of a fresh `python -I` after `statement`."""
    result = subprocess.run([sys.executable, "-I", "-c", f"{statement}\n{MEMORY_PROBE}"],
                            capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        return f"failed: {result.stderr.strip().splitlines()[-1:]}"
    rss, private, modules = (int(field) for field in result.stdout.split())
    return {"rss": rss, "private": private, "modules_loaded": modules}


def time_command(argv: Sequence[str], repeats: int) -> dict[str, Any]:
    samples_ms = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(list(argv), capture_output=True, timeout=60, check=False)
        samples_ms.append((time.perf_counter() - started) * 1000)
    return {"argv": list(argv), "samples_ms": samples_ms,
            "summary_ms": Summary.of(samples_ms).as_dict()}


def time_delete_command(binary: str, repeats: int) -> dict[str, Any]:
    """The shim binary's `delete` on a bundle whose container is already gone (what
    containerd runs after every container, often after the bundle was cleaned)."""
    with tempfile.TemporaryDirectory(prefix="kyb-bench-bundle-") as bundle:
        namespace = f"kyb-bench-{os.getpid()}"
        return time_command([binary, "-namespace", namespace, "-address",
                             f"/run/kyb-bench-{os.getpid()}-absent.sock", "-publish-binary",
                             "containerd", "-id", "absent", "-bundle", bundle, "delete"], repeats)


def measure_entry_costs(runtimes: Sequence[str], repeats: int) -> dict[str, Any]:
    bin_dir = os.path.dirname(sys.executable)
    search_path = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    report: dict[str, Any] = {
        "python_bare": time_command([sys.executable, "-I", "-c", "pass"], repeats),
        "python_site": time_command([sys.executable, "-c", "pass"], repeats),
        "binary_version_flag": {},
        "delete_command_without_container": {},
        "python_bare_memory": memory_after("pass"),
    }
    for runtime in runtimes:
        binary = shutil.which(SHIM_BINARIES[runtime], path=search_path)
        if binary is not None:
            report["binary_version_flag"][runtime] = time_command([binary, "-v"], repeats)
            report["delete_command_without_container"][runtime] = time_delete_command(binary, repeats)
    if KYBERNATE in runtimes:
        report["kybernate_imports"] = {
            action: import_profile(modules, repeats)
            for action, modules in KYBERNATE_COMMAND_MODULES.items()
        }
    return report


# ---- 4. where the time goes ---------------------------------------------------------


def step_label(span: ProcessSpan, start_command: int | None, server: int | None,
               delete_commands: set[int], runc_seen: dict[int, int]) -> str:
    """Name a program of one `ctr run --rm` by its place in the run: the shim's own
    commands, the server, and runc's create, start, delete in the order runc's shim and
    ours both call them."""
    name = os.path.basename(span.executable)
    if span.pid == start_command:
        return "shim start command"
    if span.pid in delete_commands:
        return "shim delete command"
    if span.pid == server:
        return "shim server (exec to exit)"
    if name == "runc":
        order = runc_seen.get(span.parent or 0, 0)
        runc_seen[span.parent or 0] = order + 1
        if span.parent in delete_commands:
            return "runc delete (by shim delete command)"
        return ("runc create", "runc start", "runc delete")[order] if order < 3 else f"runc #{order + 1}"
    if span.executable.startswith(("/dev/fd/", "/proc/self/exe")):
        return "runc init"
    return name


def step_breakdown(trace: SchedTrace, containerd_threads: set[int]) -> dict[str, Any] | None:
    """The programs of the one `ctr run` this process started, relative to its exec."""
    spans = trace.spans()
    runs = [s for s in spans if s.parent == os.getpid() and s.executable.endswith("/ctr")
            and s.exit_at is not None]
    if not runs:
        return None
    run = max(runs, key=lambda s: s.seconds or 0.0)
    run_end = run.exit_at if run.exit_at is not None else run.exec_at
    inside = [s for s in spans if run.exec_at <= s.exec_at <= run_end
              and trace.descends_from(s.pid, containerd_threads)]
    shim_names = set(SHIM_BINARIES.values())
    shim_commands = [s.pid for s in inside if os.path.basename(s.executable) in shim_names
                     and s.parent in containerd_threads]
    start_command = shim_commands[0] if shim_commands else None
    servers = [s.pid for s in inside if start_command is not None and s.parent == start_command]
    server = servers[0] if servers else None
    delete_commands = set(shim_commands[1:])
    runc_seen: dict[int, int] = {}
    steps: list[dict[str, Any]] = []
    for span in inside:
        steps.append({
            "label": step_label(span, start_command, server, delete_commands, runc_seen),
            "executable": span.executable,
            "pid": span.pid,
            "start_ms": (span.exec_at - run.exec_at) * 1000,
            "end_ms": None if span.exit_at is None else (span.exit_at - run.exec_at) * 1000,
            "duration_ms": None if span.seconds is None else span.seconds * 1000,
        })
    by_label = {step["label"]: step for step in steps}

    def duration(label: str) -> float | None:
        return by_label[label]["duration_ms"] if label in by_label else None

    server_to_runc = None
    if "shim server (exec to exit)" in by_label and "runc create" in by_label:
        server_to_runc = by_label["runc create"]["start_ms"] - by_label["shim server (exec to exit)"]["start_ms"]
    # The same span for both shims: Kybernate's server is forked from its template
    # (no exec of its own), runc's is exec'd by its start command.
    start_to_runc = None
    if "shim start command" in by_label and "runc create" in by_label:
        start_to_runc = by_label["runc create"]["start_ms"] - by_label["shim start command"]["start_ms"]
    return {
        "steps": steps,
        "derived_ms": {
            "ctr run": (run_end - run.exec_at) * 1000,
            "shim start command": duration("shim start command"),
            "server exec to runc create": server_to_runc,
            "start command exec to runc create": start_to_runc,
            "runc create": duration("runc create"),
            "shim delete command": duration("shim delete command"),
        },
    }


def trace_runs(containerd: Containerd, image: str, runtimes: Sequence[str], runs: int,
               run_tag: str) -> dict[str, Any]:
    """A few extra `ctr run --rm` per runtime with the scheduler's fork/exec/exit events
    recorded: which program of the run costs what (separate from the timed runs)."""
    if shutil.which("perf") is None:
        return {"skipped": "perf is not installed"}
    report: dict[str, Any] = {runtime: {"runs": []} for runtime in runtimes}
    with tempfile.TemporaryDirectory(prefix="kyb-bench-trace-") as scratch:
        for index in range(runs):
            for runtime in round_order(index, runtimes):
                recording = Path(scratch) / f"{SHORT_NAMES[runtime]}-{index}.perf"
                # Kybernate's serving processes are forked by its template, which
                # containerd did not start in this trace: its programs count as ours.
                threads = thread_ids(containerd.pid)
                for template in containerd.template_pids():
                    with contextlib.suppress(OSError):
                        threads |= thread_ids(template)
                with sched_events_recorded(recording):
                    outcome = time_one_run(containerd, image, runtime,
                                           f"{run_tag}-trace-{SHORT_NAMES[runtime]}-{index}")
                if not outcome.ok:
                    report[runtime]["runs"].append({"error": outcome.error})
                    continue
                report[runtime]["runs"].append(step_breakdown(read_sched_trace(recording), threads))
    for runtime in runtimes:
        breakdowns = [r for r in report[runtime]["runs"] if r and "derived_ms" in r]
        medians: dict[str, float | None] = {}
        for key in (breakdowns[0]["derived_ms"] if breakdowns else {}):
            values = [b["derived_ms"][key] for b in breakdowns if b["derived_ms"][key] is not None]
            medians[key] = statistics.median(values) if values else None
        report[runtime]["median_ms"] = medians
    return report


# ---- the run ------------------------------------------------------------------------


def ratios_and_targets(latency: dict[str, Any], memory: dict[str, Any]) -> dict[str, Any]:
    def median_of(section: dict[str, Any], runtime: str, key: str) -> float | None:
        entry = section.get(runtime) or {}
        value = entry.get(key)
        if isinstance(value, dict):
            return value.get("median")
        return None

    values: dict[str, float | None] = {}
    for name, section, key in (("latency", latency, "summary_ms"), ("pss", memory, "pss"),
                               ("rss", memory, "rss"), ("uss", memory, "uss")):
        kyb, base = median_of(section, KYBERNATE, key), median_of(section, RUNC, key)
        values[name] = ratio(kyb, base) if kyb is not None and base is not None else None
    kyb_share = (memory.get(KYBERNATE) or {}).get("pss_per_container_with_template")
    runc_share = (memory.get(RUNC) or {}).get("pss_per_container_with_template")
    values["pss_with_template"] = (ratio(kyb_share, runc_share)
                                   if kyb_share is not None and runc_share is not None else None)
    targets = [Target("latency median ratio kybernate/runc", LATENCY_TARGET, values["latency"]),
               Target("PSS median ratio kybernate/runc", PSS_TARGET, values["pss"]),
               Target("PSS per container, template included, kybernate/runc", PSS_PER_CONTAINER_TARGET,
                      values["pss_with_template"])]
    return {"ratios_kybernate_over_runc": values, "targets": [t.as_dict() for t in targets]}


def format_table(results: dict[str, Any]) -> str:
    runtimes = results["runtimes"]
    mib = 1024 * 1024
    lines = [f"{'':<40}" + "".join(f"{SHORT_NAMES[r]:>12}" for r in runtimes) + f"{'ratio':>10}"]

    def row(label: str, pick: Any, unit_div: float, fmt: str, ratio_key: str | None) -> None:
        cells = []
        for runtime in runtimes:
            value = pick(runtime)
            cells.append(f"{value / unit_div:>12{fmt}}" if value is not None else f"{'-':>12}")
        r = results["ratios_kybernate_over_runc"].get(ratio_key) if ratio_key else None
        lines.append(f"{label:<40}" + "".join(cells) + (f"{r:>10.2f}" if r is not None else ""))

    def latency(key: str) -> Any:
        return lambda rt: (results["latency"][rt]["summary_ms"] or {}).get(key)

    def memory(key: str, stat: str) -> Any:
        return lambda rt: (results["memory"].get(rt, {}).get(key) or {}).get(stat)

    row("ctr run --rm median ms", latency("median"), 1, ".1f", "latency")
    row("  p90 ms", latency("p90"), 1, ".1f", None)
    row("  min ms", latency("min"), 1, ".1f", None)
    row("  max ms", latency("max"), 1, ".1f", None)
    row("shim PSS median MiB", memory("pss", "median"), mib, ".2f", "pss")
    row("shim RSS median MiB", memory("rss", "median"), mib, ".2f", "rss")
    row("shim USS median MiB", memory("uss", "median"), mib, ".2f", "uss")
    row("shim PSS mean MiB", memory("pss", "mean"), mib, ".2f", None)
    row("shim threads median", memory("threads", "median"), 1, ".0f", None)
    row("PSS per container, template incl. MiB",
        lambda rt: (results["memory"].get(rt) or {}).get("pss_per_container_with_template"),
        mib, ".2f", "pss_with_template")
    trace = results.get("trace") or {}
    if all(isinstance(trace.get(r), dict) and "median_ms" in trace[r] for r in runtimes):
        for step in trace[runtimes[0]]["median_ms"]:
            row(f"traced: {step} ms", lambda rt, step=step: trace[rt]["median_ms"].get(step), 1,
                ".1f", None)
    for target in results["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        value = "-" if target["value"] is None else f"{target['value']:.2f}"
        lines.append(f"target: {target['name']} <= {target['limit']}: {value} ({verdict})")
    return "\n".join(lines)


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    stamp = utc_stamp()
    run_tag = f"bench-{os.getpid()}-{uuid.uuid4().hex[:4]}"
    runtimes = args.runtimes
    results: dict[str, Any] = {
        "benchmark": "shim",
        "started_utc": stamp,
        "parameters": {"runs": args.runs, "warmups": args.warmups, "containers": args.containers,
                       "settle_seconds": args.settle, "runtimes": runtimes,
                       "trace_runs": args.trace_runs,
                       "meets_minimum_runs": args.runs >= MINIMUM_RUNS},
        "machine": machine_info({
            "containerd": ["containerd", "--version"],
            "runc": ["runc", "--version"],
            "ctr": ["ctr", "--version"],
        }),
        "runtimes": runtimes,
    }
    with private_containerd_with_busybox() as (containerd, image):
        results["image"] = image
        print(f"latency: {args.warmups} warm-up + {args.runs} timed runs per runtime", flush=True)
        results["latency"] = measure_latency(containerd, image, runtimes, args.runs, args.warmups,
                                             run_tag)
        results["memory"] = {}
        for runtime in runtimes:
            print(f"memory: {args.containers} containers under {runtime}", flush=True)
            results["memory"][runtime] = measure_memory(containerd, image, runtime,
                                                        args.containers, args.settle, run_tag)
        if args.trace_runs:
            print(f"trace: {args.trace_runs} run(s) per runtime under perf's sched events", flush=True)
            results["trace"] = trace_runs(containerd, image, runtimes, args.trace_runs, run_tag)
    if not args.skip_entry_costs:
        print("entry cost: shim binaries and imports", flush=True)
        results["entry_costs"] = measure_entry_costs(runtimes, repeats=10)
    results.update(ratios_and_targets(results["latency"], results["memory"]))
    results["finished_utc"] = utc_stamp()
    stamped, latest = write_results(args.out, "shim", results, stamp)
    print(format_table(results))
    print(f"results: {stamped}\n         {latest}")
    return results


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def runtime_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in RUNTIMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"runtimes must be among {', '.join(RUNTIMES)}; got {text!r}")
    return [runtime for runtime in RUNTIMES if runtime in names]  # baseline first


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.shim_bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=positive_int, default=25,
                        help=f"timed `ctr run --rm` per runtime (issue 2 wants >= {MINIMUM_RUNS})")
    parser.add_argument("--containers", type=positive_int, default=10,
                        help="containers running per runtime for the memory figures")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    parser.add_argument("--warmups", type=int, default=2, help="untimed runs per runtime first")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds to wait after the containers run before reading memory")
    parser.add_argument("--runtimes", type=runtime_list, default=list(RUNTIMES),
                        help="comma-separated subset of the two runtimes (for development)")
    parser.add_argument("--trace-runs", type=int, default=3,
                        help="extra runs per runtime traced with perf for a per-step breakdown "
                             "(0: none)")
    parser.add_argument("--skip-entry-costs", action="store_true",
                        help="leave out the shim binary and import timings")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("the shim benchmark runs containers: run it as root", file=sys.stderr)
        return 2
    try:
        with termination_as_interrupt():
            run_benchmark(args)
    except KeyboardInterrupt as interrupt:
        print(f"interrupted ({str(interrupt) or 'Ctrl-C'}); everything it started was removed",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
