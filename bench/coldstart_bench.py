"""Time to the first correct answer of a warmed-up model server: cold start against
restore, through Kybernate and through containerd's runc shim, in one run.

    .venv/bin/python -m bench.coldstart_bench [--sizes 256,1024,2048] [--rounds 1]
                                              [--out DIR] [--cache-dir DIR] [--s3-sizes 256]

The workload is `bench/workload/inference_server.py` in an image of Debian's python3
with numpy and scikit-learn (`bench/server_image.py`): at start it builds a retrieval
model of SIZE MiB (embeddings, an IVF index trained with MiniBatchKMeans, a Ridge head),
warms its cache, then listens on 127.0.0.1 (host network). The answer measured is a
POST /predict with `"cache": false`, so it is computed from the model in memory.

For each size and round, one checkpoint per runtime, then every restore path of it:

| path | what the user runs |
|---|---|
| cold, per runtime | `ctr run -d --net-host --runtime R IMAGE C python3 /srv/server.py ...` |
| kybernate local, annotation | a new container with `io.kybernate.restore-from=NAME` (the Kubernetes golden-snapshot path) |
| kybernate local, ctr | `ctr container restore --live C REF` |
| kybernate S3 | as the annotation path, through another agent (another node) that has only the bucket: it downloads, verifies, restores |
| runc, ctr | `ctr container restore --live C REF` under io.containerd.runc.v2 (the baseline) |
| kybernate lazy | as the annotation path, with `io.kybernate.restore.lazy=true`: CRIU's lazy pages, the task answers while its memory is still arriving |

The checkpoint is `ctr container checkpoint --task C REF` (leave running) of the cold
container once it has answered. Sizes measured from S3 checkpoint through an agent with
the remote tier configured, whose upload is awaited before any restore; the others
through an agent without one, so no upload ever runs beside a measured restore. Every restored server's first answer must be byte for
byte the answer its cold original gave (checked, recorded as `identical`); the two cold
servers (one per runtime) must agree with each other too.

Results: DIR/coldstart-<UTC>.json and DIR/coldstart-latest.json: samples, medians,
ratios (cold / restore: the speed-up; Kybernate restore / runc restore) and the issue's
targets. Everything created (containers, images, content, agents, the S3 server, the
private containerd, temporary directories) is removed however the run ends; the
downloaded packages and the built image archive stay in --cache-dir.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kybernate.sandbox.containerd import KYBERNATE_RUNTIME, Containerd

from bench.common import (
    CONTAINER_TOOLS,
    RESULTS_DIR,
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
    remove_checkpoint_copies,
    remove_container,
    run_benchmark_main,
    utc_stamp,
)
from bench.server_image import DEFAULT_CACHE, SERVER_IMAGE_REF, SERVER_PATH, server_image_archive
from tests.support.agent import AgentProcess, running_agent

RUNC_RUNTIME = "io.containerd.runc.v2"
SPEEDUP_TARGET = 10.0  # issue 9: restore at least 10x faster than the cold start
LAZY_TARGET = 0.3  # issue 9: lazy restore's first answer at most 0.3x a full restore
ANSWER_TIMEOUT_S = 600.0
POLL_S = 0.005
S3_BUCKET = "kybernate-coldstart"
S3_PREFIX = "bench/"
QUERY = {"vector": [((i * 37) % 101 - 50) / 25.0 for i in range(128)], "k": 10, "cache": False}
PATHS = ("kybernate_local_annotation", "kybernate_local_ctr", "kybernate_s3", "runc_ctr",
         "kybernate_lazy")


# ---- asking the server -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ask(port: int, timeout: float = 120.0) -> bytes | None:
    """The server's answer to QUERY, or None while nothing listens on the port."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/predict", body=json.dumps(QUERY),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        body = response.read()
    except (ConnectionRefusedError, ConnectionResetError, http.client.RemoteDisconnected):
        return None
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"server on {port} answered {response.status}: {body[:200]!r}")
    return body


def server_stats(port: int) -> dict[str, float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/stats")
        return dict(json.loads(connection.getresponse().read()))
    finally:
        connection.close()


@dataclass
class Answered:
    """One start (cold or restore) up to the server's first answer."""

    first_answer_s: float
    command_s: float  # until the ctr command returned (a cold `ctr run -d` returns early)
    answer: bytes


def first_answer(containerd: Containerd, args: Sequence[str], port: int) -> Answered:
    """Run `ctr ARGS` and poll the port until the server answers; both timed from the
    moment ctr is started."""
    with socket.socket() as probe:
        # A server left over from the previous start would answer for this one.
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise RuntimeError(f"port {port} is still served before ctr {' '.join(args[:3])}")
    process = subprocess.Popen(containerd.ctr_argv(*args), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=containerd.environment())
    started = time.monotonic()
    command_s: float | None = None
    try:
        while True:
            now = time.monotonic()
            if command_s is None and process.poll() is not None:
                command_s = now - started
                if process.returncode != 0:
                    error = (process.stderr.read() if process.stderr else "").strip()
                    raise RuntimeError(f"ctr {' '.join(args[:3])} failed ({process.returncode}): "
                                       f"{error.splitlines()[-1] if error else '(no output)'}")
            if now - started > ANSWER_TIMEOUT_S:
                raise TimeoutError(f"no answer on port {port} within {ANSWER_TIMEOUT_S:.0f}s")
            body = ask(port)
            if body is not None:
                answered_at = time.monotonic() - started
                break
            time.sleep(POLL_S)
        if command_s is None:
            process.wait(timeout=ANSWER_TIMEOUT_S)
            command_s = time.monotonic() - started
            if process.returncode != 0:
                raise RuntimeError(f"ctr {' '.join(args[:3])} failed ({process.returncode}) "
                                   "after the server answered")
        return Answered(first_answer_s=answered_at, command_s=command_s, answer=body)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


# ---- the benchmark's world ------------------------------------------------------------------


@dataclass
class World:
    containerd: Containerd
    agent: AgentProcess  # node A: checkpoints and restores, no remote tier
    # With S3: node A' checkpoints and uploads (its promoter must not run beside the
    # other sizes' restores), node B has the same bucket and an empty tier.
    uploader: AgentProcess | None
    node_b: AgentProcess | None
    s3_url: str | None
    workdir: Path

    def ctr(self, *args: str, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
        return ctr_checked(self.containerd, *args, timeout=timeout)

    def agents(self) -> list[AgentProcess]:
        return [a for a in (self.agent, self.uploader, self.node_b) if a is not None]

    @staticmethod
    def committed_of(agent: AgentProcess, container_id: str, timeout: float = 300.0) -> Path:
        """The agent's committed copy (its commit follows the Checkpoint call's return)."""
        deadline = time.monotonic() + timeout
        while True:
            for directory in reversed(agent.committed_checkpoints()):
                with contextlib.suppress(OSError, ValueError):
                    metadata = json.loads((directory / "metadata.json").read_text())
                    if metadata.get("container", {}).get("id") == container_id:
                        return directory
            if time.monotonic() > deadline:
                raise RuntimeError(f"the agent committed no checkpoint of {container_id}")
            time.sleep(0.05)


@contextlib.contextmanager
def s3_server(workdir: Path) -> Iterator[str]:
    """moto's S3 server in its own process (it must not share the benchmark's GIL) with
    the bucket made; stopped on the way out."""
    port = free_port()
    log = (workdir / "moto.log").open("wb")
    moto = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env={**os.environ, "TMPDIR": str(workdir)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start: {(workdir / 'moto.log').read_text()[-2000:]}")
            time.sleep(0.1)
        s3_client(url).create_bucket(Bucket=S3_BUCKET)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def s3_client(url: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                        aws_access_key_id="bench", aws_secret_access_key="bench")


def s3_toml(url: str) -> str:
    return (f'[s3]\nbucket = "{S3_BUCKET}"\nendpoint_url = "{url}"\nprefix = "{S3_PREFIX}"\n'
            'region = "us-east-1"\naccess_key_id = "bench"\nsecret_access_key = "bench"\n'
            "backoff_base_s = 0.2\npromote_interval_s = 2.0\n")


@contextlib.contextmanager
def bench_world(workdir: Path, archive: Path, with_s3: bool) -> Iterator[World]:
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(s3_server(workdir)) if with_s3 else None
        # The local tiers under /tmp, as containerd's checkpoint directories: one
        # filesystem, so the agent's export into containerd's path can hard-link.
        agent = stack.enter_context(running_agent(workdir, "node-a"))
        uploader = node_b = None
        if url is not None:
            uploader = stack.enter_context(running_agent(workdir, "node-a-s3", extra_toml=s3_toml(url)))
            node_b = stack.enter_context(running_agent(workdir, "node-b", extra_toml=s3_toml(url)))
        containerd = stack.enter_context(private_containerd_with_image(archive, SERVER_IMAGE_REF))
        yield World(containerd=containerd, agent=agent, uploader=uploader, node_b=node_b, s3_url=url,
                    workdir=workdir)


# ---- one size, one round ---------------------------------------------------------------------


@dataclass
class Start:
    path: str
    first_answer_s: float | None = None
    command_s: float | None = None
    identical: bool | None = None
    error: str | None = None


@dataclass
class Round:
    size_mib: int
    round: int
    order: list[str]
    load_average: list[float]
    cold: dict[str, Start] = field(default_factory=dict)  # runtime -> cold start
    cold_answers_identical: bool | None = None
    startup_phases_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    checkpoint_s: dict[str, float] = field(default_factory=dict)
    checkpoint_bytes: int | None = None
    upload_wait_s: float | None = None  # from the checkpoint's end until S3 had it
    # The store's own speed for the same objects, measured right after the upload:
    # boto3's download_file as the agent calls it (ranged GETs in parallel), and one
    # plain GET per object. moto reads a whole object for every range it serves.
    s3_ranged_download_s: float | None = None
    s3_single_get_download_s: float | None = None
    restores: dict[str, Start] = field(default_factory=dict)


def server_argv(size_mib: int, port: int) -> list[str]:
    return ["python3", SERVER_PATH, "--model-mib", str(size_mib), "--port", str(port)]


def run_options(runtime: str, agent: AgentProcess) -> list[str]:
    options = ["--net-host", "--runtime", runtime]
    if runtime == KYBERNATE_RUNTIME:
        options += ["--annotation", f"io.kybernate.agent-socket={agent.socket}"]
    return options


def measure_round(world: World, size_mib: int, round_index: int, order: Sequence[str],
                  with_s3: bool) -> Round:
    record = Round(size_mib=size_mib, round=round_index, order=list(order),
                   load_average=list(os.getloadavg()))
    answers: dict[str, bytes] = {}
    for runtime in order:
        name = "kybernate" if runtime == KYBERNATE_RUNTIME else "runc"
        try:
            _cold_checkpoint_restores(world, record, runtime, name, size_mib, answers, with_s3)
        except (RuntimeError, TimeoutError, OSError, subprocess.TimeoutExpired) as err:
            print(f"  {name} {size_mib} MiB round {round_index}: FAILED: {err}", file=sys.stderr)
            record.cold.setdefault(name, Start(path=f"cold_{name}", error=str(err)))
            if record.cold[name].error is None:
                record.cold[name].error = f"after the cold start: {err}"
    if len(answers) == 2:
        record.cold_answers_identical = len(set(answers.values())) == 1
    return record


def _cold_checkpoint_restores(world: World, record: Round, runtime: str, name: str, size_mib: int,
                              answers: dict[str, bytes], with_s3: bool) -> None:
    container_id = f"kyb-cold-{name}-{size_mib}-{uuid.uuid4().hex[:6]}"
    checkpoint_ref = f"docker.io/kybernate-bench/{container_id}:ckpt"
    port = free_port()
    made: list[str] = [container_id]
    s3 = with_s3 and world.uploader is not None and world.node_b is not None and world.s3_url is not None
    agent = world.uploader if s3 and world.uploader is not None else world.agent
    try:
        cold = first_answer(world.containerd, ["run", "-d", *run_options(runtime, agent), SERVER_IMAGE_REF,
                                               container_id, *server_argv(size_mib, port)], port)
        record.cold[name] = Start(path=f"cold_{name}", first_answer_s=cold.first_answer_s,
                                  command_s=cold.command_s)
        answers[name] = cold.answer
        record.startup_phases_ms[name] = server_stats(port)
        print(f"  {size_mib:>5} MiB {name:<9} cold start: first answer {cold.first_answer_s:7.2f}s "
              f"(server phases {record.startup_phases_ms[name]})", flush=True)

        started = time.monotonic()
        world.ctr("container", "checkpoint", "--task", container_id, checkpoint_ref)
        checkpointed_at = time.monotonic()
        record.checkpoint_s[name] = checkpointed_at - started
        remove_container(world.containerd, container_id)

        def restore(path: str, args: Sequence[str], restored_id: str) -> None:
            made.append(restored_id)
            start = Start(path=path)
            record.restores[path] = start
            try:
                answered = first_answer(world.containerd, args, port)
                start.first_answer_s, start.command_s = answered.first_answer_s, answered.command_s
                start.identical = answered.answer == cold.answer
                speedup = cold.first_answer_s / answered.first_answer_s
                print(f"  {size_mib:>5} MiB {path:<27} first answer {answered.first_answer_s:7.2f}s "
                      f"({speedup:5.1f}x faster than cold; identical: {start.identical})", flush=True)
            except (RuntimeError, TimeoutError, OSError) as err:
                start.error = str(err)
                print(f"  {size_mib:>5} MiB {path}: FAILED: {err}", file=sys.stderr)
            finally:
                remove_container(world.containerd, restored_id)

        if runtime == RUNC_RUNTIME:
            restore("runc_ctr", ["container", "restore", "--live", container_id, checkpoint_ref], container_id)
            return
        committed = world.committed_of(agent, container_id)
        metadata = json.loads((committed / "metadata.json").read_text())
        checkpoint_name = str(metadata["name"])
        record.checkpoint_bytes = sum(int(entry["size"]) for entry in metadata["files"].values())
        if s3 and world.s3_url is not None:
            # The upload first, so that no restore below runs beside it.
            record.upload_wait_s = wait_uploaded(
                agent, f"{world.containerd.namespace}/{checkpoint_name}") - checkpointed_at
            record.s3_ranged_download_s, record.s3_single_get_download_s = s3_download_seconds(
                world.s3_url, str(metadata["id"]), world.workdir)
        restore("kybernate_local_ctr", ["container", "restore", "--live", container_id, checkpoint_ref],
                container_id)
        annotated = f"{container_id}-a"
        restore("kybernate_local_annotation",
                ["run", "-d", *run_options(runtime, agent), "--annotation",
                 f"io.kybernate.restore-from={checkpoint_name}", SERVER_IMAGE_REF, annotated,
                 *server_argv(size_mib, port)], annotated)
        lazy = f"{container_id}-l"
        restore("kybernate_lazy",
                ["run", "-d", *run_options(runtime, agent), "--annotation",
                 f"io.kybernate.restore-from={checkpoint_name}", "--annotation", "io.kybernate.restore.lazy=true",
                 SERVER_IMAGE_REF, lazy, *server_argv(size_mib, port)], lazy)
        if s3 and world.node_b is not None:
            from_s3 = f"{container_id}-s3"
            restore("kybernate_s3",
                    ["run", "-d", *run_options(runtime, world.node_b),
                     "--annotation", f"io.kybernate.restore-from={checkpoint_name}",
                     SERVER_IMAGE_REF, from_s3, *server_argv(size_mib, port)], from_s3)
    finally:
        with interrupts_deferred():
            _remove_everything(world, made, checkpoint_ref)


def wait_uploaded(agent: AgentProcess, checkpoint_name: str, timeout: float = 900.0) -> float:
    """When the agent's registry stopped calling the checkpoint (namespace/name) dirty
    (monotonic)."""
    from kybernate.api.client import AgentClient
    from kybernate.protos import agent_pb2

    async def dirty() -> bool:
        async with AgentClient(agent.socket) as client:
            response = await client.inspect_checkpoint(
                agent_pb2.InspectCheckpointRequest(checkpoint=checkpoint_name), timeout=30)
            return bool(response.record.dirty)

    deadline = time.monotonic() + timeout
    while asyncio.run(dirty()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"checkpoint {checkpoint_name} not uploaded within {timeout:.0f}s")
        time.sleep(0.1)
    return time.monotonic()


def s3_download_seconds(url: str, checkpoint_id: str, workdir: Path) -> tuple[float, float]:
    """Seconds to download every object of a checkpoint with boto3's download_file
    (default transfer settings, as the agent), then with one GET per object."""
    from boto3.s3.transfer import TransferConfig

    client = s3_client(url)
    keys = [item["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=S3_BUCKET, Prefix=f"{S3_PREFIX}{checkpoint_id}/") for item in page.get("Contents", [])]
    target = Path(tempfile.mkdtemp(prefix="s3-download-", dir=workdir))
    timings = []
    try:
        for config in (TransferConfig(), TransferConfig(multipart_threshold=1 << 62)):
            started = time.monotonic()
            for index, key in enumerate(keys):
                client.download_file(S3_BUCKET, key, str(target / str(index)), Config=config)
            timings.append(time.monotonic() - started)
            for leftover in target.iterdir():
                leftover.unlink()
    finally:
        shutil.rmtree(target, ignore_errors=True)
    return timings[0], timings[1]


def _remove_everything(world: World, container_ids: Sequence[str], checkpoint_ref: str) -> None:
    """Containers, the checkpoint image and its content, every local copy (node A's,
    node B's, containerd's unpacked restore copies) and the bucket's objects: a 2 GiB
    checkpoint otherwise lives on in six places."""
    for container_id in container_ids:
        with contextlib.suppress(Exception):
            remove_container(world.containerd, container_id)
    remove_checkpoint_copies(world.containerd, checkpoint_ref,
                             [d for agent in world.agents() for d in agent.committed_checkpoints()])
    if world.s3_url is not None:
        with contextlib.suppress(Exception):
            client = s3_client(world.s3_url)
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET):
                for item in page.get("Contents", []):
                    client.delete_object(Bucket=S3_BUCKET, Key=item["Key"])


# ---- summaries ------------------------------------------------------------------------------


def summarise(rounds: Sequence[Round], sizes: Sequence[int]) -> dict[str, Any]:
    per_size: dict[str, Any] = {}
    for size in sizes:
        mine = [r for r in rounds if r.size_mib == size]

        def median_of(values: list[float | None]) -> dict[str, Any] | None:
            good = [v for v in values if v is not None]
            return Summary.of(good).as_dict() if good else None

        entry: dict[str, Any] = {"cold": {}, "restore": {}, "checkpoint_s": {}}
        for runtime in ("kybernate", "runc"):
            entry["cold"][runtime] = median_of(
                [r.cold[runtime].first_answer_s for r in mine if runtime in r.cold])
            entry["checkpoint_s"][runtime] = median_of([r.checkpoint_s.get(runtime) for r in mine])
        for path in PATHS:
            entry["restore"][path] = median_of(
                [r.restores[path].first_answer_s for r in mine if path in r.restores])
        identical = [s.identical for r in mine for s in r.restores.values() if s.identical is not None]
        entry["all_restored_answers_identical"] = all(identical) if identical else None
        entry["restored_answers_checked"] = len(identical)
        entry["cold_answers_identical"] = [r.cold_answers_identical for r in mine]
        entry["s3"] = {key: median_of([getattr(r, key) for r in mine])
                       for key in ("upload_wait_s", "s3_ranged_download_s", "s3_single_get_download_s")}
        entry["checkpoint_bytes"] = median_of([r.checkpoint_bytes for r in mine if r.checkpoint_bytes])

        def med(section: str, key: str, entry: dict[str, Any] = entry) -> float | None:
            stats = entry[section].get(key)
            return stats["median"] if stats else None

        def speedup(path: str) -> float | None:
            # each restore against the cold start of its own runtime
            cold = med("cold", "runc" if path == "runc_ctr" else "kybernate")
            restored = med("restore", path)
            return None if cold is None or not restored else cold / restored

        def over_runc(path: str) -> float | None:
            restored, baseline = med("restore", path), med("restore", "runc_ctr")
            return None if restored is None or baseline is None else ratio(restored, baseline)

        entry["speedup_over_cold"] = {path: speedup(path) for path in PATHS}
        entry["restore_over_runc_restore"] = {path: over_runc(path) for path in PATHS if path != "runc_ctr"}
        # The shim's share of a cold start is a few hundred ms: every cold start of this
        # size, both runtimes, is one sample of the workload's start-up (more samples
        # against the neighbours' load swinging the wall time).
        pooled = [s.first_answer_s for r in mine for s in r.cold.values() if s.first_answer_s is not None]
        entry["cold_pooled"] = Summary.of(pooled).as_dict() if pooled else None

        def over_pooled(path: str, entry: dict[str, Any] = entry) -> float | None:
            restored = med("restore", path)
            return entry["cold_pooled"]["median"] / restored if entry["cold_pooled"] and restored else None

        entry["speedup_over_pooled_cold"] = {path: over_pooled(path) for path in PATHS}
        lazy, full = med("restore", "kybernate_lazy"), med("restore", "kybernate_local_annotation")
        entry["targets"] = [
            *(Target(f"{path} restore / median cold start (speed-up >= {SPEEDUP_TARGET:g}x)",
                     1 / SPEEDUP_TARGET, None if not (speed := over_pooled(path)) else 1 / speed).as_dict()
              for path in PATHS if path not in ("runc_ctr", "kybernate_lazy")),
            Target("lazy first answer / full restore", LAZY_TARGET,
                   ratio(lazy, full) if lazy is not None and full else None).as_dict(),
        ]
        per_size[str(size)] = entry
    return per_size


def print_table(per_size: dict[str, Any]) -> None:
    print("\nmedian time to first answer, s (speed-up over the median cold start of the size, both runtimes)")
    header = (f"{'MiB':>5} {'cold kyb':>9} {'cold runc':>9} {'cold all':>9} "
              + " ".join(f"{p[:18]:>18}" for p in PATHS))
    print(header)
    for size, entry in per_size.items():
        def cell(path: str, entry: dict[str, Any] = entry) -> str:
            stats = entry["restore"].get(path)
            speed = entry["speedup_over_pooled_cold"].get(path)
            if not stats:
                return f"{'-':>18}"
            return f"{stats['median']:8.2f} ({speed:5.1f}x)" if speed else f"{stats['median']:8.2f}"
        cold = [entry["cold"][r]["median"] if entry["cold"][r] else float("nan") for r in ("kybernate", "runc")]
        pooled = entry["cold_pooled"]["median"] if entry["cold_pooled"] else float("nan")
        print(f"{size:>5} {cold[0]:9.2f} {cold[1]:9.2f} {pooled:9.2f} " + " ".join(f"{cell(p):>18}" for p in PATHS))
        print(f"{'':>5} answers identical after every restore: {entry['all_restored_answers_identical']} "
              f"({entry['restored_answers_checked']} checked); cold servers agree: "
              f"{entry['cold_answers_identical']}")


# ---- the run -------------------------------------------------------------------------------


def run(sizes: Sequence[int], rounds: int, out_dir: Path, cache: Path, s3_sizes: Sequence[int]) -> dict[str, Any]:
    stamp = utc_stamp()
    machine = machine_info(CONTAINER_TOOLS)
    built = time.monotonic()
    archive = server_image_archive(cache, sys.executable)
    image_build_s = time.monotonic() - built
    records: list[Round] = []
    workdir = Path(tempfile.mkdtemp(prefix="kyb-cold-", dir="/tmp"))
    started = time.monotonic()
    try:
        with bench_world(workdir, archive, bool(s3_sizes)) as world:
            for round_index in range(rounds):
                for size in sizes:
                    runtimes = alternating([KYBERNATE_RUNTIME, RUNC_RUNTIME], round_index + sizes.index(size))
                    records.append(measure_round(world, size, round_index, runtimes, size in s3_sizes))
            agent_log_tail = "\n".join(f"--- {a.log_path.name} ---\n{a.log()[-2000:]}" for a in world.agents())
    finally:
        with interrupts_deferred():
            shutil.rmtree(workdir, ignore_errors=True)
    per_size = summarise(records, sizes)
    payload = {
        "benchmark": "coldstart",
        "stamp": stamp,
        "machine": {**machine, "load_average_at_end": list(os.getloadavg())},
        "parameters": {
            "sizes_mib": list(sizes), "rounds": rounds, "s3_sizes_mib": list(s3_sizes),
            "image": SERVER_IMAGE_REF,
            "image_archive": archive.name, "image_archive_bytes": archive.stat().st_size,
            "image_build_or_cache_s": image_build_s, "query": QUERY,
            "cold_command": "ctr run -d --net-host --runtime R IMAGE C python3 /srv/server.py ...",
            "checkpoint_command": "ctr container checkpoint --task C REF",
            "paths": PATHS, "wall_s": time.monotonic() - started,
        },
        "results": per_size,
        "rounds": [asdict(r) for r in records],
        "agent_log_tail": agent_log_tail if records else "",
    }
    print_table(per_size)
    publish_results(out_dir, "coldstart", payload, stamp)
    return payload


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.coldstart_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,1024,2048",
                        help="model sizes in MiB, comma-separated (default 256,1024,2048)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds per size (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help=f"downloaded packages and the built image (default {DEFAULT_CACHE})")
    parser.add_argument("--s3-sizes", default="256",
                        help="sizes that also restore from S3 (moto), comma-separated, 'all' or 'none' "
                             "(default 256: moto serves each ranged GET by reading the whole object, "
                             "so its download time grows with the square of the size)")
    args = parser.parse_args(argv)
    args.sizes = parse_sizes(parser, args.sizes)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.s3_sizes == "all":
        args.s3_sizes = list(args.sizes)
    elif args.s3_sizes == "none":
        args.s3_sizes = []
    else:
        args.s3_sizes = parse_sizes(parser, args.s3_sizes, "--s3-sizes")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_benchmark_main(lambda: run(args.sizes, args.rounds, args.out, args.cache_dir, args.s3_sizes))


if __name__ == "__main__":
    sys.exit(main())
