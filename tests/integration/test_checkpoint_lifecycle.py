"""The checkpoint lifecycle on the command line, through a real containerd, shim,
agent, runc, CRIU and an S3 server (moto): promote, fetch (and its access rule), rm
(local, remote, never while in use), gc under the retention policy, list --json; and
the agent's /metrics scraped during a real checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kybernate.api.client import AgentClient
from kybernate.protos import agent_pb2
from kybernate.shim.agent_settings import ANNOTATION_AGENT_SOCKET
from prometheus_client.parser import text_string_to_metric_families

from tests.support.agent import AgentProcess, temporary_workdir
from tests.support.containerd import KYBERNATE_RUNTIME, Containerd
from tests.support.images import BUSYBOX_IMAGE_REF
from tests.support.s3 import S3Server, free_port
from tests.support.tasks import private_containerd, remove_container

pytestmark = pytest.mark.integration

NAMESPACE_OF = "lifecycle"


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with temporary_workdir("kyb-lifecycle") as path:
        yield path


@pytest.fixture(scope="module")
def ctd(busybox_archive: Path) -> Iterator[Containerd]:
    with private_containerd(Containerd(), busybox_archive) as instance:
        yield instance


@pytest.fixture
def s3() -> Iterator[S3Server]:
    server = S3Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def names(ctd: Containerd) -> Iterator[Callable[[str], str]]:
    made: list[str] = []

    def make(prefix: str) -> str:
        made.append(f"kyb-{prefix}-{uuid.uuid4().hex[:6]}")
        return made[-1]

    yield make
    for container_id in made:
        remove_container(ctd, container_id)


def s3_toml(s3: S3Server, bucket: str) -> str:
    # The sweep stays out of the way: uploads happen at commit, or by `promote`.
    return (f'[s3]\nbucket = "{bucket}"\nendpoint_url = "{s3.url}"\nprefix = "kyb/"\nregion = "us-east-1"\n'
            'access_key_id = "k"\nsecret_access_key = "s"\nmax_attempts = 2\nbackoff_base_s = 0.05\n'
            "backoff_max_s = 0.1\npromote_interval_s = 3600\nrequest_max_attempts = 1\n")


def cli(agent: AgentProcess, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "kybernate", "checkpoint", *args, "--socket", str(agent.socket)],
                            capture_output=True, text=True, timeout=120, check=False)
    if check:
        assert result.returncode == 0, result.stderr + agent.log()[-3000:]
    return result


def listing(agent: AgentProcess) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in map(json.loads, cli(agent, "list", "--json").stdout.splitlines())}


def run(ctd: Containerd, agent: AgentProcess, container_id: str) -> None:
    result = ctd.ctr("run", "--runtime", KYBERNATE_RUNTIME, "-d", "--annotation",
                     f"{ANNOTATION_AGENT_SOCKET}={agent.socket}", BUSYBOX_IMAGE_REF, container_id, "sh", "-c",
                     "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done", timeout=120)
    assert result.returncode == 0, result.stderr
    ctd.wait_task_status(container_id, "RUNNING")


def checkpoint(ctd: Containerd, agent: AgentProcess, container_id: str) -> dict[str, Any]:
    """`ctr task checkpoint`; the registry's record of the new checkpoint."""
    before = set(listing(agent))
    # ctr names the checkpoint's content by the second: two in one second collide.
    second = int(time.time())
    while int(time.time()) == second:
        time.sleep(0.05)
    result = ctd.ctr("task", "checkpoint", container_id, timeout=120)
    assert result.returncode == 0, result.stderr + agent.log()[-2000:]
    if result.stdout.strip():
        ctd.ctr("images", "rm", result.stdout.strip().splitlines()[-1], timeout=30)
    new = [r for i, r in listing(agent).items() if i not in before]
    assert len(new) == 1 and new[0]["state"] == "committed", new
    return new[0]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def remote_keys(s3: S3Server, bucket: str, checkpoint_id: str) -> list[str]:
    page = s3.client().list_objects_v2(Bucket=bucket, Prefix=f"kyb/checkpoints/{checkpoint_id}/")
    return [obj["Key"] for obj in page.get("Contents", [])]


def test_promote_fetch_and_rm_against_s3(workdir: Path, ctd: Containerd, s3: S3Server,
                                         names: Callable[[str], str]) -> None:
    bucket = f"kyb-life-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    s3.make_bucket(bucket)
    agent = AgentProcess.in_dir(workdir, f"promote-{uuid.uuid4().hex[:6]}", extra_toml=s3_toml(s3, bucket))
    agent.write_config(extra_toml=s3_toml(s3, bucket), node_name="node-a")
    agent.start()
    try:
        source = names("life")
        run(ctd, agent, source)
        # S3 down at commit: the checkpoint stays local and dirty.
        s3.stop()
        taken = checkpoint(ctd, agent, source)
        wait_until(lambda: "stays dirty" in agent.log(), "the upload to give up")
        assert listing(agent)[taken["id"]]["dirty"] is True
        s3.start()

        promoted = json.loads(cli(agent, "promote", taken["name"], "-n", ctd.namespace, "--json").stdout)
        assert promoted["tier"] == "remote" and not promoted.get("dirty", False)
        keys = remote_keys(s3, bucket, taken["id"])
        assert f"kyb/checkpoints/{taken['id']}/metadata.json" in keys and len(keys) == taken["file_count"] + 1

        # rm without --remote: the local copy goes, the record stays (the bucket has it).
        out = cli(agent, "rm", taken["id"]).stdout
        assert "local copy" in out and "remote copy" not in out
        assert not (agent.local_tier / taken["id"]).exists()
        assert listing(agent)[taken["id"]]["tier"] == "remote"
        assert not listing(agent)[taken["id"]].get("local_path")

        # fetch for another namespace: refused before a byte is downloaded.
        refused = cli(agent, "fetch", f"{ctd.namespace}/{taken['name']}", "-n", f"{ctd.namespace}-other",
                      check=False)
        assert refused.returncode != 0 and "not shared with" in refused.stderr, refused.stderr
        refused = cli(agent, "fetch", taken["id"], "-n", f"{ctd.namespace}-other", check=False)
        assert refused.returncode != 0 and "not shared with" in refused.stderr, refused.stderr
        assert not (agent.local_tier / taken["id"]).exists()

        fetched = json.loads(cli(agent, "fetch", taken["name"], "-n", ctd.namespace, "--json").stdout)
        assert fetched["local_path"] == str(agent.local_tier / taken["id"])
        assert "verified" in cli(agent, "verify", taken["id"]).stdout

        # In use by a restore (between PrepareRestore and CompleteRestore): never removed.
        async def prepare() -> None:
            async with AgentClient(agent.socket) as client:
                await client.prepare_restore(agent_pb2.PrepareRestoreRequest(
                    checkpoint=taken["id"], namespace=ctd.namespace, container_id="restoring-one"))
        asyncio.run(prepare())
        busy = cli(agent, "rm", "--remote", taken["id"], check=False)
        assert busy.returncode != 0 and "in use by restore of container restoring-one" in busy.stderr, busy.stderr
        assert (agent.local_tier / taken["id"]).exists()

        async def complete() -> None:
            async with AgentClient(agent.socket) as client:
                await client.complete_restore(agent_pb2.CompleteRestoreRequest(
                    container_id="restoring-one", init_pid=os.getpid()))
        asyncio.run(complete())

        out = cli(agent, "rm", "--remote", taken["id"]).stdout
        assert "local copy" in out and "remote copy" in out
        assert taken["id"] not in listing(agent)
        assert remote_keys(s3, bucket, taken["id"]) == []
        assert not (agent.local_tier / taken["id"]).exists()
    finally:
        agent.stop()


def test_gc_keeps_the_newest_and_holds_the_local_budget(workdir: Path, ctd: Containerd, s3: S3Server,
                                                         names: Callable[[str], str]) -> None:
    bucket = f"kyb-gc-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    s3.make_bucket(bucket)
    node = f"gc-{uuid.uuid4().hex[:6]}"
    agent = AgentProcess.in_dir(workdir, node, extra_toml=s3_toml(s3, bucket))
    agent.start()
    try:
        source = names("gc")
        run(ctd, agent, source)
        taken = [checkpoint(ctd, agent, source) for _ in range(3)]
        wait_until(lambda: all(listing(agent)[t["id"]]["tier"] == "remote" for t in taken), "the uploads")
        oldest, middle, newest = taken
        agent.stop()
        # Keep two per container; the local tier holds about one checkpoint.
        budget = int(newest["size_bytes"]) * 3 // 2
        agent.write_config(extra_toml=s3_toml(s3, bucket)
                           + f"[retention]\nkeep_per_container = 2\nlocal_max_bytes = {budget}\ninterval_s = 0\n")
        agent.start()

        planned = json.loads(cli(agent, "gc", "--dry-run", "--json").stdout)
        assert {(c["record"]["id"], c["scope"]) for c in planned["collected"]} == {
            (oldest["id"], "all"), (middle["id"], "local")}
        assert set(listing(agent)) >= {t["id"] for t in taken}, "a dry run removes nothing"

        done = json.loads(cli(agent, "gc", "--json").stdout)
        assert {(c["record"]["id"], c["scope"]) for c in done["collected"]} == {
            (oldest["id"], "all"), (middle["id"], "local")}
        assert int(done["freed_local_bytes"]) >= int(oldest["size_bytes"]) + int(middle["size_bytes"])
        rows = listing(agent)
        assert oldest["id"] not in rows and remote_keys(s3, bucket, oldest["id"]) == []
        assert rows[middle["id"]]["tier"] == "remote" and not rows[middle["id"]].get("local_path")
        assert remote_keys(s3, bucket, middle["id"]), "its remote copy stays: a restore fetches it"
        assert rows[newest["id"]]["local_path"]
        # Applied again, nothing more goes.
        assert json.loads(cli(agent, "gc", "--json").stdout).get("collected", []) == []
    finally:
        agent.stop()


def test_metrics_scraped_during_a_checkpoint(workdir: Path, ctd: Containerd, names: Callable[[str], str]) -> None:
    port = free_port()
    agent = AgentProcess.in_dir(workdir, f"metrics-{uuid.uuid4().hex[:6]}", hold_after_phase={"dumped": 3.0},
                                extra_toml=f"[metrics]\nport = {port}\noccupancy_interval_s = 0.2\n")
    agent.start()
    try:
        source = names("metrics")
        run(ctd, agent, source)

        def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                    for family in text_string_to_metric_families(body) for sample in family.samples}

        result: dict[str, subprocess.CompletedProcess[str]] = {}
        worker = threading.Thread(target=lambda: result.update(done=ctd.ctr("task", "checkpoint", source,
                                                                                 timeout=120)))
        worker.start()
        # Mid-checkpoint: dumped, held there, not committed yet.
        wait_until(lambda: scrape().get(("kybernate_checkpoint_phase_seconds_count", (("phase", "dumped"),)), 0) >= 1,
                   "the dumped phase in /metrics")
        during = scrape()
        assert during.get(("kybernate_checkpoints_total", (("result", "committed"),)), 0) == 0
        assert during[("kybernate_phase_bytes_total", (("phase", "dumped"),))] > 0
        assert during[("kybernate_phase_gigabytes_per_second", (("phase", "dumped"),))] > 0
        assert during[("kybernate_checkpoint_phase_duration_seconds_count", (("phase", "frozen"),))] == 1
        worker.join(120)
        assert result["done"].returncode == 0, result["done"].stderr
        if result["done"].stdout.strip():
            ctd.ctr("images", "rm", result["done"].stdout.strip().splitlines()[-1], timeout=30)
        wait_until(lambda: scrape().get(("kybernate_tier_checkpoints", (("tier", "local"),)), 0) == 1,
                   "the local tier's count")
        after = scrape()
        assert after[("kybernate_checkpoints_total", (("result", "committed"),))] == 1
        assert after[("kybernate_phase_bytes_total", (("phase", "committed"),))] > 0
        assert after[("kybernate_tier_bytes", (("tier", "local"),))] > 0
        assert after[("kybernate_dirty_checkpoints", ())] == 0
        assert ("kybernate_upload_retries_total", ()) in after
        assert ("kybernate_restores_total", (("result", "ok"), ("step", "prepare"))) not in after
    finally:
        agent.stop()


def test_progress_on_a_terminal_and_quiet_in_a_pipe(workdir: Path, ctd: Containerd,
                                                     names: Callable[[str], str]) -> None:
    agent = AgentProcess.in_dir(workdir, f"progress-{uuid.uuid4().hex[:6]}")
    agent.start()
    try:
        source = names("progress")
        run(ctd, agent, source)
        taken = checkpoint(ctd, agent, source)
        command = [sys.executable, "-m", "kybernate", "checkpoint", "verify", taken["id"], "--socket",
                   str(agent.socket)]

        # stderr on a terminal: the progress line, drawn and redrawn in place, then cleared.
        import pty

        leader, follower = pty.openpty()
        try:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=follower, stdin=subprocess.DEVNULL)
            os.close(follower)
            drawn = b""
            while True:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # EIO: the last writer closed
                    break
                if not chunk:
                    break
                drawn += chunk
            out, _ = process.communicate(timeout=60)
        finally:
            os.close(leader)
        assert process.returncode == 0, drawn
        assert b"\r" in drawn and b"verifying" in drawn and b"(100%)" in drawn, drawn
        assert out.decode().startswith("verified "), out

        # Not a terminal: nothing but the result.
        piped = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        assert piped.returncode == 0 and piped.stderr == "", piped.stderr
        assert piped.stdout.startswith("verified ") and "\r" not in piped.stdout
    finally:
        agent.stop()
