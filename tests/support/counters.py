"""Counting containers under Kybernate through ctr, checkpointed with `ctr task
checkpoint` and managed with the `kybernate checkpoint` command: what the restore,
lifecycle and checkpoint-image tests share.

The container's shell counts in memory and writes each value to /tmp/count: a restore
goes on from the checkpoint's value, where a fresh start counts from 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from kybernate.shim.agent_settings import ANNOTATION_AGENT_SOCKET, ANNOTATION_RESTORE_FROM

from tests.support.agent import AgentProcess
from tests.support.containerd import KYBERNATE_RUNTIME, Containerd
from tests.support.images import BUSYBOX_IMAGE_REF
from tests.support.tasks import remove_container

COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done"


@contextmanager
def container_names(*views: Containerd) -> Iterator[Callable[[str], str]]:
    """Fresh container ids; every container of those ids removed afterwards, in each view."""
    made: list[str] = []

    def make(prefix: str) -> str:
        made.append(f"kyb-{prefix}-{uuid.uuid4().hex[:6]}")
        return made[-1]

    try:
        yield make
    finally:
        for container_id in made:
            for view in views:
                remove_container(view, container_id)


def run(ctd: Containerd, agent: AgentProcess, container_id: str, *, restore_from: str = "",
        check: bool = True) -> str:
    """`ctr run -d` of a counter under Kybernate; its stderr (empty when it worked)."""
    args = ["run", "--runtime", KYBERNATE_RUNTIME, "-d", "--annotation", f"{ANNOTATION_AGENT_SOCKET}={agent.socket}"]
    if restore_from:
        args += ["--annotation", f"{ANNOTATION_RESTORE_FROM}={restore_from}"]
    result = ctd.ctr(*args, BUSYBOX_IMAGE_REF, container_id, "sh", "-c", COUNTER, timeout=180)
    if check:
        assert result.returncode == 0, result.stderr + agent.log()[-3000:]
        ctd.wait_task_status(container_id, "RUNNING")
    return result.stderr


def count(ctd: Containerd, container_id: str) -> int:
    """The counter (read again when caught between the file's truncation and write)."""
    for _ in range(50):
        result = ctd.ctr("task", "exec", "--exec-id", f"c{uuid.uuid4().hex[:6]}", container_id, "cat",
                         "/tmp/count", timeout=60)
        assert result.returncode == 0, result.stderr
        if result.stdout.strip():
            return int(result.stdout.strip())
    raise AssertionError(f"{container_id}: /tmp/count stayed empty")


def wait_for_count(ctd: Containerd, container_id: str, least: int) -> None:
    deadline = time.monotonic() + 60
    while count(ctd, container_id) < least:
        assert time.monotonic() < deadline, f"{container_id} never counted to {least}"
        time.sleep(0.2)


def cli(agent: AgentProcess, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`kybernate checkpoint ARGS` against `agent`."""
    result = subprocess.run([sys.executable, "-m", "kybernate", "checkpoint", *args, "--socket", str(agent.socket)],
                            capture_output=True, text=True, timeout=180, check=False)
    if check:
        assert result.returncode == 0, result.stderr + agent.log()[-3000:]
    return result


def records(agent: AgentProcess) -> dict[str, dict[str, Any]]:
    """`kybernate checkpoint list --json`, by id."""
    return {r["id"]: r for r in map(json.loads, cli(agent, "list", "--json").stdout.splitlines())}


def checkpoint(ctd: Containerd, agent: AgentProcess, container_id: str) -> dict[str, Any]:
    """`ctr task checkpoint` through the agent; the registry's record of the new checkpoint."""
    before = set(records(agent))
    # ctr names the checkpoint's content by the second: two in one second collide.
    second = int(time.time())
    while int(time.time()) == second:
        time.sleep(0.05)
    result = ctd.ctr("task", "checkpoint", container_id, timeout=120)
    assert result.returncode == 0, result.stderr + agent.log()[-2000:]
    if result.stdout.strip():
        ctd.ctr("images", "rm", result.stdout.strip().splitlines()[-1], timeout=30)
    # Checkpoint returns once containerd has the images; the agent's commit follows.
    deadline = time.monotonic() + 60
    while True:
        new = [r for i, r in records(agent).items() if i not in before]
        if (len(new) == 1 and new[0]["state"] == "committed") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(new) == 1 and new[0]["state"] == "committed", new
    return new[0]
