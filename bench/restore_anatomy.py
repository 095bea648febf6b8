"""Where a checkpoint's and a restore's time goes, phase by phase: Kybernate beside
runc's path (io.containerd.runc.v2), one container per runtime and size, in one run.

    .venv/bin/python -m bench.restore_anatomy [--sizes 512,2048] [--rounds 1]
                                              [--workload memhold|server] [--out DIR]

Each sample runs memhold SIZE MiB (the checkpoint benchmark's image and workload) or the
cold-start benchmark's model server of SIZE MiB, then:

1. `ctr container checkpoint --task C REF` (leave running) while `perf` records the
   scheduler's fork/exec/exit events: every program our containerd, shims and agent
   ran, with its start and run time; CRIU's dump.log is kept (runc's path writes it
   into the bundle's work directory, Kybernate's agent into its CRIU work directory);
2. the container is removed and `ctr container restore --live C REF` runs under the
   same trace; CRIU's restore.log is copied out of the bundle (Kybernate's shim runs
   `runc restore` with the work path `criu-restore`, containerd's runc shim with `work`);
3. for Kybernate: the agent's PrepareRestore on the committed checkpoint, timed through
   its gRPC API (what the shim waits for before `runc restore`), and the checksum
   verification alone (`kybernate.agent.commit.verify`, in this process), each twice:
   the first pass is what a restore right after the checkpoint pays.

CRIU stamps every log line with the seconds since it started ("(00.123456) ..."):
the logs are cut into CRIU's own phases (milestones below) and the longest silences
between two lines are listed with the lines around them, so a difference between the
two paths shows where it arises. The raw logs go beside the results file, gzipped.

Results: DIR/anatomy-<UTC>.json (and -latest), logs in DIR/anatomy-<UTC>/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kybernate.sandbox.images import import_image

from bench.checkpoint_bench import (
    HEARTBEAT_THRESHOLD_US,
    IMAGE_REF,
    RUNTIMES,
    Bench,
    bench_world,
    program_spans,
    wait_for,
)
from bench.coldstart_bench import ask, free_port, server_argv
from bench.common import (
    CONTAINER_TOOLS,
    RESULTS_DIR,
    FileKeeper,
    alternating,
    interrupts_deferred,
    machine_info,
    parse_sizes,
    publish_results,
    read_sched_trace,
    remove_checkpoint_copies,
    remove_container,
    run_benchmark_main,
    sched_events_recorded,
    utc_stamp,
)
from bench.server_image import SERVER_IMAGE_REF, server_image_archive

CRIU_LINE = re.compile(r"^\((?P<at>\d+\.\d+)\)\s?(?P<text>.*)$")
# CRIU's restore, in the order it logs them (CRIU 4.2 at log level 4, which runc sets):
# the first line matching each pattern starts that milestone.
RESTORE_MILESTONES = (
    ("start", r"Version: "),
    ("network locked", r"Running network-lock scripts|Lock network"),
    ("mount namespace", r"Restoring mounts|mnt: Restoring|Populating mount namespace"),
    ("forking tasks", r"Forking task with|Forking\s"),
    ("restoring memory", r"Restore private vmas|premap|Restoring memory|restore_priv_vma"),
    ("restorer jump", r"Jumping to restorer|restorer"),
    ("tasks resumed", r"Restore finished successfully|Restoring resources|Finalize"),
    ("network unlocked", r"Unlock network|Running network-unlock"),
)
DUMP_MILESTONES = (
    ("start", r"Version: "),
    ("freezing", r"Freezing|freezer"),
    ("seized", r"Seized task|Seizing"),
    ("dumping memory", r"Dumping pages|dump_pages|page-pipe|Transferring pages"),
    ("writing images", r"Writing image|inventory"),
    ("unfreezing", r"Unfreezing|Unseizing|Unlock network"),
    ("finished", r"Dumping finished successfully"),
)


# ---- CRIU's log ----------------------------------------------------------------------------


def criu_log_lines(text: str) -> list[tuple[float, str]]:
    lines = []
    for line in text.splitlines():
        match = CRIU_LINE.match(line)
        if match:
            lines.append((float(match["at"]), match["text"]))
    return lines


def criu_log_anatomy(text: str, milestones: Sequence[tuple[str, str]], gaps: int = 12) -> dict[str, Any]:
    """Total time, milestones (first matching line, its time) and the longest silences."""
    lines = criu_log_lines(text)
    if not lines:
        return {"lines": 0}
    found = []
    for name, pattern in milestones:
        regex = re.compile(pattern)
        hit = next(((at, line) for at, line in lines if regex.search(line)), None)
        if hit is not None:
            found.append({"milestone": name, "at_s": hit[0], "line": hit[1][:160]})
    pairs = sorted(itertools.pairwise(lines), key=lambda pair: pair[0][0] - pair[1][0])[:gaps]
    silences = [{"after_s": a[0], "seconds": round(b[0] - a[0], 6), "before": a[1][:160], "after": b[1][:160]}
                for a, b in pairs]
    pages = [line for _, line in lines if "pages" in line.lower()]
    return {"lines": len(lines), "total_s": lines[-1][0], "milestones": found,
            "longest_silences": silences, "page_lines": len(pages), "first_page_lines": pages[:8]}


CONTAINERD_LINE = re.compile(r'^time="(?P<date>[^".]+)(?:\.(?P<frac>\d+))?Z" level=(?P<level>\w+) msg="(?P<msg>(?:[^"\\]|\\.)*)"(?P<rest>.*)$')


def containerd_lines(log: Path, start_wall: float, end_wall: float, limit: int = 120) -> list[dict[str, Any]]:
    """containerd's log lines (its shims' included) stamped within [start, end] of the
    wall clock, as offsets from the start: what containerd did between the programs."""
    import datetime

    found = []
    with contextlib.suppress(OSError):
        for line in log.read_text(errors="replace").splitlines():
            match = CONTAINERD_LINE.match(line)
            if not match:
                continue
            stamp = datetime.datetime.fromisoformat(match["date"]).replace(tzinfo=datetime.UTC).timestamp()
            stamp += float(f"0.{match['frac'] or 0}")
            if start_wall <= stamp <= end_wall:
                found.append({"at_s": round(stamp - start_wall, 4), "level": match["level"],
                              "msg": match["msg"][:160], "fields": match["rest"].strip()[:200]})
    return found[:limit]


# ---- one sample --------------------------------------------------------------------------------


@dataclass
class Sample:
    runtime: str
    size_mib: int
    round: int
    workload: str = "memhold"
    checkpoint_s: float | None = None
    restore_s: float | None = None
    restore_until_ready_s: float | None = None  # memhold verified again / the server answered
    checkpoint_programs: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_containerd_log: list[dict[str, Any]] = field(default_factory=list)
    restore_containerd_log: list[dict[str, Any]] = field(default_factory=list)
    restore_programs: list[dict[str, Any]] = field(default_factory=list)
    dump_log: dict[str, Any] = field(default_factory=dict)
    restore_log: dict[str, Any] = field(default_factory=dict)
    agent_timings_ms: dict[str, int] | None = None
    shim_phases_ms: dict[str, int] | None = None
    prepare_restore_s: list[float] = field(default_factory=list)  # the agent's RPC, twice
    prepare_restore_sealed_s: list[float] = field(default_factory=list)  # by id: the seals, twice
    verify_in_process_s: list[float] = field(default_factory=list)  # commit.verify, twice
    checkpoint_bytes: int | None = None
    pretouch_s: float | None = None  # --pretouch-gib: the helper's fill, before the restore
    error: str | None = None


def keep_log(text: str, logs_dir: Path, name: str) -> str:
    """Gzip the log into the results' log folder; returns it."""
    if text:
        logs_dir.mkdir(parents=True, exist_ok=True)
        with gzip.open(logs_dir / f"{name}.gz", "wt") as f:
            f.write(text)
    return text


def prepare_restore_seconds(bench: Bench, directory: Path, *, sealed: bool = False) -> float:
    """The agent's PrepareRestore of a committed checkpoint: given as a directory (no
    seal is consulted: every file is hashed), or by registry id (`sealed`: the seals
    of the local copy stand in for the hash)."""
    from kybernate.api.client import AgentClient
    from kybernate.protos import agent_pb2

    if sealed:
        request = agent_pb2.PrepareRestoreRequest(checkpoint=directory.name, namespace=bench.containerd.namespace)
    else:
        request = agent_pb2.PrepareRestoreRequest(directory=str(directory))

    async def call() -> float:
        async with AgentClient(bench.agent.socket) as client:
            started = time.monotonic()
            await client.prepare_restore(request, timeout=600)
            return time.monotonic() - started
    return asyncio.run(call())


def verify_seconds(directory: Path) -> float:
    from kybernate.agent.commit import verify

    started = time.monotonic()
    verify(directory)
    return time.monotonic() - started


def start_workload(bench: Bench, runtime: str, container_id: str, size_mib: int,
                   workload: str) -> Callable[[], bool]:
    """Run memhold (with the heartbeat) or the model server in a new container; returns
    the check that it is ready (memhold verified its pattern, the server answered)."""
    annotations = (("--annotation", f"io.kybernate.agent-socket={bench.agent.socket}")
                   if runtime == "kybernate" else ())
    if workload == "server":
        port = free_port()
        bench.ctr("run", "-d", "--net-host", "--runtime", RUNTIMES[runtime], *annotations, SERVER_IMAGE_REF,
                  container_id, *server_argv(size_mib, port), timeout=60)
        return lambda: ask(port) is not None
    command = (f"/bin/heartbeat /tmp/gaps {HEARTBEAT_THRESHOLD_US} & "
               f"exec /bin/memhold {size_mib} 7 /tmp/memhold")
    bench.ctr("run", "-d", "--runtime", RUNTIMES[runtime], *annotations, IMAGE_REF, container_id,
              "sh", "-c", command, timeout=60)
    return lambda: bench.memhold_rounds(container_id) >= 1


def pretouch(gib: float) -> float:
    """Fill and free `gib` GiB in a child process; its seconds. On a VM whose balloon
    reports free pages to the host (these machines), memory that no one touched
    lately costs a host fault on its first write (the touch rate), and a restore that
    allocates its memory there pays it; after this the next allocations find memory
    the host backs, as a node's memory is on bare metal."""
    started = time.monotonic()
    fill = "import mmap, sys\nsize = int(sys.argv[1])\nm = mmap.mmap(-1, size)\nfor i in range(0, size, 4096): m[i] = 1"
    subprocess.run([sys.executable, "-c", fill, str(int(gib * (1 << 30)))], check=True)
    return time.monotonic() - started


def measure(bench: Bench, runtime: str, size_mib: int, round_index: int, logs_dir: Path,
            workload: str, pretouch_gib: float = 0.0) -> Sample:
    sample = Sample(runtime=runtime, size_mib=size_mib, round=round_index, workload=workload)
    container_id = f"kyb-anat-{runtime}-{size_mib}-{uuid.uuid4().hex[:6]}"
    checkpoint_ref = f"docker.io/kybernate/anat-{container_id}:1"
    tag = f"{runtime}-{size_mib}-r{round_index}"
    try:
        ready = start_workload(bench, runtime, container_id, size_mib, workload)
        wait_for(f"{workload} in {container_id}", ready, timeout=900)

        recording = bench.workdir / f"sched-{container_id}.data"
        try:
            with sched_events_recorded(recording, clockid="CLOCK_MONOTONIC"):
                ancestors = bench.ancestors()
                # runc's shim dumps into the bundle's `work` link (containerd's root dir)
                work_dirs = [(bench.bundle(container_id) / "work").resolve(), bench.agent.state_dir]
                with FileKeeper(lambda: [p for d in work_dirs for p in d.rglob("dump.log")]) as dump_log:
                    started, started_wall = time.monotonic(), time.time()
                    bench.ctr("container", "checkpoint", "--task", container_id, checkpoint_ref)
                    ended = time.monotonic()
                sample.checkpoint_containerd_log = containerd_lines(
                    bench.containerd.log_path, started_wall, started_wall + (ended - started))
                sample.checkpoint_s = ended - started
                checkpoint_window = (started, ended)
                sample.dump_log = criu_log_anatomy(keep_log(dump_log.text, logs_dir, f"dump-{tag}.log"),
                                                   DUMP_MILESTONES)
                if runtime == "kybernate":
                    # The agent commits after containerd's resume, once Checkpoint returned.
                    wait_for(f"the agent's commit of {container_id}",
                             lambda: bool(bench.committed_of(container_id)), timeout=300)
                    committed = bench.committed_of(container_id)[-1]
                    metadata = json.loads((committed / "metadata.json").read_text())
                    sample.agent_timings_ms = {k: int(v) for k, v in metadata.get("timings_ms", {}).items()}
                    sample.checkpoint_bytes = sum(int(e["size"]) for e in metadata["files"].values())
                    sample.shim_phases_ms = bench.shim_phases_ms(container_id)
                remove_container(bench.containerd, container_id)
                if pretouch_gib:
                    sample.pretouch_s = pretouch(pretouch_gib)
                started, started_wall = time.monotonic(), time.time()
                bench.ctr("container", "restore", "--live", container_id, checkpoint_ref)
                ended = time.monotonic()
                sample.restore_s = ended - started
                sample.restore_containerd_log = containerd_lines(
                    bench.containerd.log_path, started_wall, started_wall + (ended - started))
                wait_for(f"restored {workload} in {container_id}", ready, timeout=300)
                sample.restore_until_ready_s = time.monotonic() - started
                restore_window = (started, ended)
            trace = read_sched_trace(recording)
        finally:
            recording.unlink(missing_ok=True)
        sample.checkpoint_programs = program_spans(trace, ancestors, *checkpoint_window)
        sample.restore_programs = program_spans(trace, ancestors, *restore_window)
        bundle = bench.bundle(container_id)
        restore_log = next((p for p in (bundle / "criu-restore" / "restore.log", bundle / "work" / "restore.log")
                            if p.exists()), None)
        restore_text = restore_log.read_text(errors="replace") if restore_log is not None else ""
        sample.restore_log = criu_log_anatomy(keep_log(restore_text, logs_dir, f"restore-{tag}.log"),
                                              RESTORE_MILESTONES)
        if runtime == "kybernate":
            committed = bench.committed_of(container_id)[-1]
            for _ in range(2):
                sample.prepare_restore_s.append(prepare_restore_seconds(bench, committed))
                sample.prepare_restore_sealed_s.append(prepare_restore_seconds(bench, committed, sealed=True))
                sample.verify_in_process_s.append(verify_seconds(committed))
        print(f"  {tag}: checkpoint {sample.checkpoint_s:.2f}s restore {sample.restore_s:.2f}s; CRIU dump "
              f"{sample.dump_log.get('total_s')}s restore {sample.restore_log.get('total_s')}s; "
              f"PrepareRestore {sample.prepare_restore_s}, sealed {sample.prepare_restore_sealed_s}", flush=True)
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired, OSError) as err:
        sample.error = str(err)
        print(f"  {tag}: FAILED: {err}", file=sys.stderr)
    finally:
        with interrupts_deferred():
            with contextlib.suppress(Exception):
                remove_container(bench.containerd, container_id)
            remove_checkpoint_copies(bench.containerd, checkpoint_ref, bench.committed_of(container_id))
    return sample


# ---- phases -----------------------------------------------------------------------------------


def _first(programs: Sequence[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((p for p in programs if p["program"] == name and p["duration_s"] is not None), None)


def _longest(programs: Sequence[dict[str, Any]], name: str) -> dict[str, Any] | None:
    runs = [p for p in programs if p["program"] == name and p["duration_s"] is not None]
    return max(runs, key=lambda p: p["duration_s"], default=None)


def _silence_over(log: dict[str, Any], text: str) -> float:
    """The longest silence in a CRIU log that ends with a line containing `text`."""
    return max((g["seconds"] for g in log.get("longest_silences", []) if text in g["after"]), default=0.0)


def restore_phases(sample: Sample) -> dict[str, float | None]:
    """`ctr container restore` cut into consecutive phases (seconds): containerd before
    the shim (unpacking the checkpoint), the shim up to `runc restore` (for Kybernate the
    agent's PrepareRestore: verification), runc up to CRIU, CRIU itself (its memory
    restore, the restorer's page read, apart), and what follows CRIU until ctr returns
    (runc's exit, Kybernate's CompleteRestore, containerd's start)."""
    programs = sample.restore_programs
    shim = next((p for p in programs if p["program"].startswith("containerd-shim")), None)
    runc = _longest(programs, "runc")
    criu = _longest(programs, "criu")
    if shim is None or runc is None or criu is None or sample.restore_s is None:
        return {}
    # CRIU's own clock: in the trace the restored tasks' threads count as criu's (they
    # are forked by it and never exec), so its span ends with the last of them.
    criu_s = sample.restore_log.get("total_s") or criu["duration_s"]
    pages = _silence_over(sample.restore_log, "returned")
    return {
        "containerd_before_shim": shim["start_s"],
        "shim_to_runc_restore": runc["start_s"] - shim["start_s"],
        "runc_to_criu": criu["start_s"] - runc["start_s"],
        "criu_restore": criu_s,
        "criu_page_read": pages,
        "criu_other": criu_s - pages,
        "after_criu": sample.restore_s - (criu["start_s"] + criu_s),
        "total": sample.restore_s,
    }


def checkpoint_phases(sample: Sample) -> dict[str, float | None]:
    """`ctr container checkpoint --task` (leave running) cut into phases (seconds): up
    to CRIU (containerd's pause; Kybernate's agent up to its freeze), CRIU's dump, then
    from CRIU's exit to containerd's `runc resume` (Kybernate's commit: hashing and
    fsync; then containerd packing the images into its content store, both while the
    task stays paused), and the resume."""
    programs = sample.checkpoint_programs
    criu = _longest(programs, "criu")
    runcs = [p for p in programs if p["program"] == "runc" and p["duration_s"] is not None]
    if criu is None or not runcs or sample.checkpoint_s is None:
        return {}
    criu_s = sample.dump_log.get("total_s") or criu["duration_s"]
    criu_end = criu["start_s"] + criu_s
    resume = max(runcs, key=lambda p: p["start_s"])
    commit = None
    if sample.shim_phases_ms and "committed" in sample.shim_phases_ms and "dumped" in sample.shim_phases_ms:
        commit = (sample.shim_phases_ms["committed"] - sample.shim_phases_ms["dumped"]) / 1000
    after = resume["start_s"] - criu_end
    return {
        "before_criu": criu["start_s"],
        "criu_dump": criu_s,
        "criu_exit_to_resume": after,
        "of_which_agent_commit": commit,
        "of_which_containerd_pack": after - commit if commit is not None else after,
        "resume_and_return": sample.checkpoint_s - resume["start_s"],
        "total": sample.checkpoint_s,
    }


def print_phases(samples: Sequence[Sample]) -> None:
    for title, phases in (("restore", restore_phases), ("checkpoint", checkpoint_phases)):
        print(f"\n{title} phases, seconds")
        for sample in samples:
            cut = phases(sample)
            if cut:
                print(f"  {sample.runtime:<9} {sample.size_mib:>5} MiB  "
                      + "  ".join(f"{k} {v:.2f}" for k, v in cut.items() if v is not None))


def run(sizes: Sequence[int], rounds: int, out_dir: Path, workload: str,
        pretouch_gib: float = 0.0) -> dict[str, Any]:
    stamp = utc_stamp()
    machine = machine_info(CONTAINER_TOOLS)
    logs_dir = out_dir / f"anatomy-{stamp}"
    samples: list[Sample] = []
    workdir = Path(tempfile.mkdtemp(prefix="kyb-anat-", dir="/tmp"))
    try:
        with bench_world(workdir) as bench:
            if workload == "server":
                import_image(bench.containerd, server_image_archive(python=sys.executable), SERVER_IMAGE_REF)
            for round_index in range(rounds):
                for size in sizes:
                    for runtime in alternating(list(RUNTIMES), round_index + sizes.index(size)):
                        samples.append(measure(bench, runtime, size, round_index, logs_dir, workload,
                                                       pretouch_gib))
    finally:
        with interrupts_deferred():
            shutil.rmtree(workdir, ignore_errors=True)
    payload = {"benchmark": "restore-anatomy", "stamp": stamp,
               "machine": {**machine, "load_average_at_end": list(os.getloadavg())},
               "parameters": {"sizes_mib": list(sizes), "rounds": rounds, "workload": workload,
                              "pretouch_gib": pretouch_gib,
                              "logs": logs_dir.name},
               "phases": [{"runtime": s.runtime, "size_mib": s.size_mib, "round": s.round,
                           "restore_s": restore_phases(s), "checkpoint_s": checkpoint_phases(s)}
                          for s in samples],
               "samples": [asdict(s) for s in samples]}
    print_phases(samples)
    publish_results(out_dir, "anatomy", payload, stamp)
    print(f"CRIU logs in {logs_dir}")
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.restore_anatomy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="512,2048", help="memhold sizes in MiB (default 512,2048)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds per size and runtime (default 1)")
    parser.add_argument("--workload", choices=("memhold", "server"), default="memhold",
                        help="memhold (the checkpoint benchmark's) or the cold-start benchmark's model server")
    parser.add_argument("--pretouch-gib", type=float, default=0.0,
                        help="before each restore, fill and free this many GiB (see pretouch())")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    sizes = parse_sizes(parser, args.sizes)
    if args.pretouch_gib < 0:
        parser.error("--pretouch-gib must not be negative")
    return run_benchmark_main(lambda: run(sizes, max(1, args.rounds), args.out, args.workload,
                                          args.pretouch_gib))


if __name__ == "__main__":
    sys.exit(main())
