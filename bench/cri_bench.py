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

Then, on containerd 2.x (whose CRI has CheckpointContainer and restores archives),
round after round and per handler, as kubelet's checkpoint API and CRI's restore see it:

4. CheckpointContainer of a running container (a counter, from an image served by a
   loopback registry: CRI's restore pulls the base image by digest) into an archive;
   the kybernate handler's pods name a node agent started for the run;
5. restore: CreateContainer with the archive as the image, then StartContainer, in a
   new pod of the same handler (until the restored counter answers is not included).

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
import uuid
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
from tests.support.agent import running_agent
from tests.support.containerd import release_named
from tests.support.cri import (
    KYBERNATE_HANDLER,
    RUNC_HANDLER,
    CriSandbox,
    cri_sandbox,
    pull_through_registry,
)
from tests.support.images import build_oci_archive
from tests.support.registry import running_registry

HANDLERS = (KYBERNATE_HANDLER, RUNC_HANDLER)
STARTUP_STEPS = ("run_pod_sandbox", "create_container", "start_container", "create_and_start",
                 "teardown")
CHECKPOINT_STEPS = ("checkpoint_container", "restore_create", "restore_start", "restore")
COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done"
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


def checkpoint_cycle(cri: CriSandbox, handler: str, image: str, agent_socket: str,
                     archive: Path) -> dict[str, float]:
    """Checkpoint a running container of `handler` through CRI, then restore it into a
    new pod of the same handler; seconds per step."""
    api, client = cri.api, cri.client
    runtime = client.runtime
    annotations = {"io.kybernate.agent-socket": agent_socket}
    times: dict[str, float] = {}
    sandbox_id, pod = cri.run_pod(f"ckpt-{handler}-{uuid.uuid4().hex[:6]}", handler, annotations=annotations)
    try:
        created = client.call(runtime.CreateContainer, api.CreateContainerRequest(
            pod_sandbox_id=sandbox_id, config=cri.container_config("counter", ["sh", "-c", COUNTER],
                                                                  image=image, pod=pod),
            sandbox_config=pod))
        client.call(runtime.StartContainer, api.StartContainerRequest(container_id=created.container_id))
        time.sleep(0.5)  # the counter has started counting
        archive.unlink(missing_ok=True)
        times["checkpoint_container"], _ = timed(lambda: client.call(
            runtime.CheckpointContainer, api.CheckpointContainerRequest(
                container_id=created.container_id, location=str(archive))))
    finally:
        cri.remove_pod(sandbox_id)
    wait_for_no_shims(cri)
    sandbox_id, pod = cri.run_pod(f"rest-{handler}-{uuid.uuid4().hex[:6]}", handler, annotations=annotations)
    try:
        times["restore_create"], restored = timed(lambda: client.call(
            runtime.CreateContainer, api.CreateContainerRequest(
                pod_sandbox_id=sandbox_id, config=cri.container_config("counter", [], image=str(archive),
                                                                      pod=pod),
                sandbox_config=pod)))
        times["restore_start"], _ = timed(lambda: client.call(
            runtime.StartContainer, api.StartContainerRequest(container_id=restored.container_id)))
        times["restore"] = times["restore_create"] + times["restore_start"]
        state = client.call(runtime.ContainerStatus, api.ContainerStatusRequest(
            container_id=restored.container_id)).status.state
        if state != api.CONTAINER_RUNNING:
            raise RuntimeError(f"the restored {handler} container is not running ({state})")
    finally:
        cri.remove_pod(sandbox_id)
    wait_for_no_shims(cri)
    return times


def wait_for_no_shims(cri: CriSandbox) -> None:
    deadline = time.monotonic() + SHIMS_GONE_TIMEOUT_S
    while cri.containerd.shim_pids():
        if time.monotonic() > deadline:
            raise RuntimeError(f"shims still running {SHIMS_GONE_TIMEOUT_S}s after their pod "
                               f"was removed: {cri.containerd.shim_pids()}")
        time.sleep(0.02)


def run(runs: int, warmups: int, containerd: str, out_dir: Path, checkpoint_runs: int) -> dict[str, Any]:
    release = release_named(containerd)
    if release.config_version < 3:
        checkpoint_runs = 0  # 1.7's CRI has no CheckpointContainer
    steps = STARTUP_STEPS + (CHECKPOINT_STEPS if checkpoint_runs else ())
    samples: dict[str, dict[str, list[float]]] = {h: {s: [] for s in steps} for h in HANDLERS}
    with tempfile.TemporaryDirectory(prefix="kyb-cri-bench-") as scratch, \
            running_agent(Path(scratch) / "agent") as agent, running_registry() as registry:
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
            if checkpoint_runs:
                image = pull_through_registry(cri, registry.host)
                archive = Path(scratch) / "checkpoint.tar"
                for handler in HANDLERS:  # warm-up: the first pull and CRIU's first run
                    checkpoint_cycle(cri, handler, image, str(agent.socket), archive)
                for round_ in range(checkpoint_runs):
                    order = HANDLERS if round_ % 2 == 0 else tuple(reversed(HANDLERS))
                    for handler in order:
                        for step, seconds in checkpoint_cycle(cri, handler, image, str(agent.socket),
                                                              archive).items():
                            samples[handler][step].append(seconds)
            left = cri.leftovers()
    summaries = {h: {s: Summary.of(v).as_dict() for s, v in steps.items()}
                 for h, steps in samples.items()}
    ratios = {step: ratio(summaries[KYBERNATE_HANDLER][step]["median"],
                          summaries[RUNC_HANDLER][step]["median"]) for step in steps}
    payload = {
        "benchmark": "cri",
        "machine": machine_info({"containerd": [release.containerd, "--version"],
                                 "runc": ["runc", "--version"]}),
        "parameters": {"runs": runs, "warmups": warmups, "checkpoint_runs": checkpoint_runs,
                       "containerd": release.name,
                       "handlers": {KYBERNATE_HANDLER: "io.containerd.kybernate.v1",
                                    RUNC_HANDLER: "io.containerd.runc.v2"},
                       "pod": "host network, static pause sandbox, busybox sleep container",
                       "checkpoint": "busybox counter from a loopback registry; CheckpointContainer "
                                     "into an archive, restore by CreateContainer(archive)+Start in a "
                                     "new pod of the same handler; kybernate with a node agent "
                                     "(fake CUDA backend)"},
        "samples_s": samples,
        "summaries_s": summaries,
        "ratios_kybernate_over_runc_median": ratios,
        "left_behind": left,
    }
    stamped, _ = write_results(out_dir, "cri", payload)
    print_table(summaries, ratios, stamped, steps)
    return payload


def print_table(summaries: dict[str, dict[str, dict[str, float | int]]],
                ratios: dict[str, float | None], stamped: Path, steps: Sequence[str]) -> None:
    print(f"{'step':<22}{'runc ms':>10}{'kybernate ms':>14}{'ratio':>8}   (medians)")
    for step in steps:
        runc = float(summaries[RUNC_HANDLER][step]["median"]) * 1000
        kyb = float(summaries[KYBERNATE_HANDLER][step]["median"]) * 1000
        value = ratios[step]
        shown = f"{value:.2f}x" if value is not None else "-"
        print(f"{step:<22}{runc:>10.1f}{kyb:>14.1f}{shown:>8}")
    print(f"results: {stamped}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.cri_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--warmups", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--containerd", default="2", help="containerd line: 2 or 1.7")
    parser.add_argument("--checkpoint-runs", type=int, default=8,
                        help="checkpoint and restore rounds per handler (2.x only; default 8)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.warmups < 0 or args.checkpoint_runs < 0:
        parser.error("--runs must be at least 1, --warmups and --checkpoint-runs not negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with termination_as_interrupt():
        try:
            run(args.runs, args.warmups, args.containerd, args.out, args.checkpoint_runs)
        except KeyboardInterrupt as interrupt:
            print(f"interrupted ({interrupt}); everything was cleaned up", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
