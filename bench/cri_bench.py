"""Pod start-up through containerd's CRI: the kybernate handler beside runc's, in one run.

    .venv/bin/python -m bench.cri_bench [--runs N] [--warmups N] [--containerd 2|1.7] [--out DIR]

A private CRI-enabled containerd (2.x unless told otherwise; see tests/support/cri.py)
with the static pause and busybox images runs, round after round, one host-network pod
per handler (`kybernate` = io.containerd.kybernate.v1, `runc` = io.containerd.runc.v2),
the order alternating round by round so drift of this shared VM hits both alike. For
each pod, as kubelet sees them (wall time of the CRI calls):

1. RunPodSandbox (the sandbox's shim start, runc create and start of pause);
2. CreateContainer + StartContainer of a busybox `sleep` (and each on its own);
3. teardown: StopContainer, RemoveContainer, StopPodSandbox, RemovePodSandbox.

After each pod the run waits until no shim of the containerd is left, so one pod's
shutdown never overlaps the next one's start. Results go to DIR/cri-<UTC stamp>.json
and DIR/cri-latest.json with the ratios kybernate/runc of the medians. Everything the
run created is removed however it ends. Nothing here asserts on a timing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    Summary,
    machine_info,
    ratio,
    termination_as_interrupt,
    write_results,
)
from tests.support.containerd import release_named
from tests.support.cri import KYBERNATE_HANDLER, RUNC_HANDLER, CriSandbox, cri_sandbox
from tests.support.images import build_oci_archive

HANDLERS = (KYBERNATE_HANDLER, RUNC_HANDLER)
STEPS = ("run_pod_sandbox", "create_container", "start_container", "create_and_start",
         "teardown")
SHIMS_GONE_TIMEOUT_S = 30.0


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds the call took, what it returned)."""
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def one_pod(cri: CriSandbox, handler: str, name: str) -> dict[str, float]:
    """Start a pod with one container under `handler` and tear it down; seconds per step."""
    api, client = cri.api, cri.client
    runtime = client.runtime
    pod = cri.pod_config(name)
    seconds, response = timed(lambda: client.call(runtime.RunPodSandbox, api.RunPodSandboxRequest(
        config=pod, runtime_handler=handler)))
    sandbox_id = response.pod_sandbox_id
    times = {"run_pod_sandbox": seconds}
    try:
        config = cri.container_config("main", ["sleep", "600"])
        times["create_container"], created = timed(lambda: client.call(
            runtime.CreateContainer, api.CreateContainerRequest(
                pod_sandbox_id=sandbox_id, config=config, sandbox_config=pod)))
        container_id = created.container_id
        times["start_container"], _ = timed(lambda: client.call(
            runtime.StartContainer, api.StartContainerRequest(container_id=container_id)))
        times["create_and_start"] = times["create_container"] + times["start_container"]
    finally:
        times["teardown"], _ = timed(lambda: cri.remove_pod(sandbox_id))
    wait_for_no_shims(cri)
    return times


def wait_for_no_shims(cri: CriSandbox) -> None:
    deadline = time.monotonic() + SHIMS_GONE_TIMEOUT_S
    while cri.containerd.shim_pids():
        if time.monotonic() > deadline:
            raise RuntimeError(f"shims still running {SHIMS_GONE_TIMEOUT_S}s after their pod "
                               f"was removed: {cri.containerd.shim_pids()}")
        time.sleep(0.02)


def run(runs: int, warmups: int, containerd: str, out_dir: Path) -> dict[str, Any]:
    release = release_named(containerd)
    samples: dict[str, dict[str, list[float]]] = {h: {s: [] for s in STEPS} for h in HANDLERS}
    with tempfile.TemporaryDirectory(prefix="kyb-cri-bench-") as scratch:
        busybox = build_oci_archive(Path(scratch) / "busybox-oci.tar")
        with cri_sandbox(release, busybox) as cri:
            for round_ in range(warmups):
                for handler in HANDLERS:
                    one_pod(cri, handler, f"warmup-{handler}-{round_}")
            for round_ in range(runs):
                order = HANDLERS if round_ % 2 == 0 else tuple(reversed(HANDLERS))
                for handler in order:
                    for step, seconds in one_pod(cri, handler, f"bench-{handler}-{round_}").items():
                        samples[handler][step].append(seconds)
            left = cri.leftovers()
    summaries = {h: {s: Summary.of(v).as_dict() for s, v in steps.items()}
                 for h, steps in samples.items()}
    ratios = {step: ratio(summaries[KYBERNATE_HANDLER][step]["median"],
                          summaries[RUNC_HANDLER][step]["median"]) for step in STEPS}
    payload = {
        "benchmark": "cri",
        "machine": machine_info({"containerd": [release.containerd, "--version"],
                                 "runc": ["runc", "--version"]}),
        "parameters": {"runs": runs, "warmups": warmups, "containerd": release.name,
                       "handlers": {KYBERNATE_HANDLER: "io.containerd.kybernate.v1",
                                    RUNC_HANDLER: "io.containerd.runc.v2"},
                       "pod": "host network, static pause sandbox, busybox sleep container"},
        "samples_s": samples,
        "summaries_s": summaries,
        "ratios_kybernate_over_runc_median": ratios,
        "left_behind": left,
    }
    stamped, _ = write_results(out_dir, "cri", payload)
    print_table(summaries, ratios, stamped)
    return payload


def print_table(summaries: dict[str, dict[str, dict[str, float | int]]],
                ratios: dict[str, float | None], stamped: Path) -> None:
    print(f"{'step':<20}{'runc ms':>10}{'kybernate ms':>14}{'ratio':>8}   (medians)")
    for step in STEPS:
        runc = float(summaries[RUNC_HANDLER][step]["median"]) * 1000
        kyb = float(summaries[KYBERNATE_HANDLER][step]["median"]) * 1000
        value = ratios[step]
        shown = f"{value:.2f}x" if value is not None else "-"
        print(f"{step:<20}{runc:>10.1f}{kyb:>14.1f}{shown:>8}")
    print(f"results: {stamped}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cri_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--warmups", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--containerd", default="2", help="containerd line: 2 or 1.7")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmups < 0:
        parser.error("--runs must be at least 1 and --warmups not negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with termination_as_interrupt():
        try:
            run(args.runs, args.warmups, args.containerd, args.out)
        except KeyboardInterrupt as interrupt:
            print(f"interrupted ({interrupt}); everything was cleaned up", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
