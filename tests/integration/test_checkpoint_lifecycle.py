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

import pytest
from kybernate.api.client import AgentClient
from kybernate.protos import agent_pb2
from prometheus_client.parser import text_string_to_metric_families

from tests.support.agent import AgentProcess, temporary_workdir
from tests.support.containerd import Containerd
from tests.support.counters import checkpoint, cli, container_names, records, run
from tests.support.s3 import S3Server, free_port, running_s3
from tests.support.tasks import private_containerd

pytestmark = pytest.mark.integration


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
    with running_s3() as server:
        yield server


@pytest.fixture
def names(ctd: Containerd) -> Iterator[Callable[[str], str]]:
    with container_names(ctd) as make:
        yield make


def s3_toml(s3: S3Server, bucket: str) -> str:
    # The sweep stays out of the way: uploads happen at commit, or by `promote`.
    return (f'[s3]\nbucket = "{bucket}"\nendpoint_url = "{s3.url}"\nprefix = "kyb/"\nregion = "us-east-1"\n'
            'access_key_id = "k"\nsecret_access_key = "s"\nmax_attempts = 2\nbackoff_base_s = 0.05\n'
            "backoff_max_s = 0.1\npromote_interval_s = 3600\nrequest_max_attempts = 1\n")


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
        assert records(agent)[taken["id"]]["dirty"] is True
        s3.start()

        promoted = json.loads(cli(agent, "promote", taken["name"], "-n", ctd.namespace, "--json").stdout)
        assert promoted["tier"] == "remote" and not promoted.get("dirty", False)
        keys = remote_keys(s3, bucket, taken["id"])
        assert f"kyb/checkpoints/{taken['id']}/metadata.json" in keys and len(keys) == taken["file_count"] + 1

        # rm without --remote: the local copy goes, the record stays (the bucket has it).
        out = cli(agent, "rm", taken["id"]).stdout
        assert "local copy" in out and "remote copy" not in out
        assert not (agent.local_tier / taken["id"]).exists()
        assert records(agent)[taken["id"]]["tier"] == "remote"
        assert not records(agent)[taken["id"]].get("local_path")

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
        assert taken["id"] not in records(agent)
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
        wait_until(lambda: all(records(agent)[t["id"]]["tier"] == "remote" for t in taken), "the uploads")
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
        assert set(records(agent)) >= {t["id"] for t in taken}, "a dry run removes nothing"

        done = json.loads(cli(agent, "gc", "--json").stdout)
        assert {(c["record"]["id"], c["scope"]) for c in done["collected"]} == {
            (oldest["id"], "all"), (middle["id"], "local")}
        assert int(done["freed_local_bytes"]) >= int(oldest["size_bytes"]) + int(middle["size_bytes"])
        rows = records(agent)
        assert oldest["id"] not in rows and remote_keys(s3, bucket, oldest["id"]) == []
        assert rows[middle["id"]]["tier"] == "remote" and not rows[middle["id"]].get("local_path")
        assert remote_keys(s3, bucket, middle["id"]), "its remote copy stays: a restore fetches it"
        assert rows[newest["id"]]["local_path"]
        # Applied again, nothing more goes.
        assert json.loads(cli(agent, "gc", "--json").stdout).get("collected", []) == []

        # In the background: keep one, every 0.3 s; the middle one goes on its own.
        agent.stop()
        agent.write_config(extra_toml=s3_toml(s3, bucket)
                           + "[retention]\nkeep_per_container = 1\ninterval_s = 0.3\n")
        agent.start()
        wait_until(lambda: middle["id"] not in records(agent), "the background run of the policy")
        assert newest["id"] in records(agent) and remote_keys(s3, bucket, middle["id"]) == []
    finally:
        agent.stop()


def test_metrics_scraped_during_a_checkpoint(workdir: Path, ctd: Containerd, names: Callable[[str], str]) -> None:
    port = free_port()
    agent = AgentProcess.in_dir(workdir, f"metrics-{uuid.uuid4().hex[:6]}", hold_after_phase={"dumped": 3.0},
                                extra_toml=f"[metrics]\nport = {port}\noccupancy_interval_s = 0.2\n"
                                           '[log]\nformat = "json"\n')
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
        # Asked for JSON logs: every line the agent wrote is one JSON object.
        lines = [json.loads(text) for text in agent.log().splitlines() if text.strip()]
        assert any(entry["logger"] == "kybernate.agent.daemon" and "serving" in entry["message"] for entry in lines)
        assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in lines)
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
