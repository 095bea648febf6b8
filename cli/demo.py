"""`kybernate demo`: the whole path on a private containerd, with built-in defaults.

It starts a private containerd and a node agent (both under one temporary directory),
builds a busybox image locally, runs a container through Kybernate whose only state
is a counter in a shell variable, execs into it, checkpoints it through containerd
(pause, CUDA-first pipeline, CRIU dump, resume, commit), kills and deletes it, and
restores it: the counter goes on from where it was instead of starting at 1. Then
everything is removed again. Needs root and the stack `.ci/setup` installs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from kybernate.sandbox.containerd import KYBERNATE_RUNTIME, Containerd, ContainerdError
from kybernate.sandbox.images import BUSYBOX_IMAGE_REF, build_oci_archive, import_image

CONTAINER = "kybernate-demo"
CHECKPOINT_REF = "kybernate.io/demo/counter:checkpoint"
COUNTER = ("i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done")
AGENT_START_TIMEOUT_S = 30.0
COMMIT_WAIT_S = 30.0


class DemoFailed(Exception):
    """A step of the demo did not do what it should; the message says which."""


class Narrator:
    """Numbered steps on stdout, with the time each took."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0

    def step(self, title: str, action: Callable[[], str | None]) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {title} ...", flush=True)
        started = time.monotonic()
        detail = action()
        elapsed = time.monotonic() - started
        print(f"      {detail + ' ' if detail else ''}({elapsed:.2f} s)", flush=True)


class DemoAgent:
    """The node agent as a subprocess with a config under the demo's directory."""

    def __init__(self, base: Path) -> None:
        self.socket = base / "agent.sock"
        self.config = base / "agent.toml"
        self.log = base / "agent.log"
        self.config.write_text(
            f'socket = "{self.socket}"\n'
            f'state_dir = "{base / "agent-state"}"\n'
            f'local_tier = "{base / "checkpoints"}"\n'
            "[checkpoint]\n"
            "min_free_bytes = 0\n")
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "kybernate.agent", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + AGENT_START_TIMEOUT_S
        while not self.socket.exists():
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise DemoFailed(f"the agent did not start; its log:\n{self.log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _read_count(containerd: Containerd, exec_id: str) -> int:
    result = containerd.ctr("task", "exec", "--exec-id", exec_id, CONTAINER, "cat", "/tmp/count",
                            check=True)
    return int(result.stdout.strip())


def run_demo(base: Path) -> None:
    narrator = Narrator(total=8)
    containerd = Containerd(base=base / "containerd", namespace="kybernate-demo")
    agent = DemoAgent(base)
    counts: dict[str, int] = {}

    with ExitStack() as cleanup:
        def start_containerd() -> str:
            containerd.base.mkdir(parents=True, exist_ok=True)
            cleanup.callback(containerd.stop)
            containerd.start()
            return f"containerd at {containerd.address}, namespace {containerd.namespace}"

        def start_agent() -> str:
            cleanup.callback(agent.stop)
            agent.start()
            return f"agent at {agent.socket}"

        def image() -> str:
            archive = build_oci_archive(base / "busybox-oci.tar")
            return f"imported {import_image(containerd, archive)}"

        def run() -> str:
            containerd.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME,
                           "--annotation", f"io.kybernate.agent-socket={agent.socket}",
                           BUSYBOX_IMAGE_REF, CONTAINER, "sh", "-c", COUNTER, check=True)
            containerd.wait_task_status(CONTAINER, "RUNNING")
            time.sleep(1.0)
            containerd.ctr("task", "exec", "--exec-id", "note", CONTAINER, "sh", "-c",
                           "echo written-before-the-checkpoint > /tmp/note", check=True)
            counts["before"] = _read_count(containerd, "peek")
            return f"ctr run --runtime {KYBERNATE_RUNTIME}; ctr task exec: count is {counts['before']}"

        def checkpoint() -> str:
            containerd.ctr("container", "checkpoint", "--task", "--rw", CONTAINER, CHECKPOINT_REF,
                           timeout=180, check=True)
            counts["checkpointed"] = _read_count(containerd, "after-checkpoint")
            # ctr returns once containerd has the images; the agent's own commit (fsync,
            # seal) follows as the container runs again: list it once that is done.
            deadline = time.monotonic() + COMMIT_WAIT_S
            while True:
                listing = subprocess.run(
                    [sys.executable, "-m", "kybernate", "checkpoint", "list", "--socket", str(agent.socket)],
                    capture_output=True, text=True, check=False).stdout.strip()
                if " staging " not in listing or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            print("\n".join(f"      | {line}" for line in listing.splitlines()))
            return (f"ctr container checkpoint --task --rw -> {CHECKPOINT_REF}; the container "
                    f"kept running (count now {counts['checkpointed']})")

        def remove() -> str:
            containerd.ctr("task", "kill", "-s", "SIGKILL", CONTAINER, check=True)
            containerd.ctr("task", "delete", CONTAINER, timeout=30)
            containerd.ctr("containers", "rm", CONTAINER, check=True)
            return "killed with SIGKILL, task and container deleted: the counter's memory is gone"

        def restore() -> str:
            containerd.ctr("container", "restore", "--live", "--rw", CONTAINER, CHECKPOINT_REF,
                           timeout=180, check=True)
            containerd.wait_task_status(CONTAINER, "RUNNING")
            time.sleep(0.5)
            restored = _read_count(containerd, "after-restore")
            note = containerd.ctr("task", "exec", "--exec-id", "read-note", CONTAINER,
                                  "cat", "/tmp/note", check=True).stdout.strip()
            if restored < counts["before"]:
                raise DemoFailed(f"restored counter is {restored}, below {counts['before']}: "
                                 "the in-memory state was not restored")
            return (f"ctr container restore --live --rw: count is {restored} (went on from "
                    f">= {counts['before']}, not from 1); /tmp/note says {note!r}")

        def clean() -> str:
            containerd.ctr("task", "kill", "-s", "SIGKILL", CONTAINER)
            containerd.ctr("task", "delete", "--force", CONTAINER, timeout=30)
            containerd.ctr("containers", "rm", CONTAINER)
            containerd.ctr("images", "rm", "--sync", CHECKPOINT_REF)
            agent.stop()
            leftovers = containerd.stop()
            if leftovers:
                raise DemoFailed(f"cleanup had to force: {', '.join(leftovers)}")
            return "containers, images, agent and containerd removed"

        narrator.step("starting a private containerd", start_containerd)
        narrator.step("starting the Kybernate node agent", start_agent)
        narrator.step("building a busybox image and importing it", image)
        narrator.step("running a container that counts in memory", run)
        narrator.step("checkpointing it through containerd", checkpoint)
        narrator.step("killing and deleting it", remove)
        narrator.step("restoring it from the checkpoint", restore)
        narrator.step("cleaning up", clean)


def demo_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="kybernate demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep-dir", action="store_true",
                        help="keep the demo's directory (logs of containerd and the agent)")
    args = parser.parse_args(list(argv))
    if os.geteuid() != 0:
        print("kybernate demo: must run as root (containerd, runc and CRIU need it)", file=sys.stderr)
        return 2
    missing = [tool for tool in ("containerd", "ctr", "runc", "criu", "busybox") if shutil.which(tool) is None]
    if missing:
        print(f"kybernate demo: {', '.join(missing)} not installed; run `bash .ci/setup` first",
              file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="kyb-demo-", dir="/tmp"))
    try:
        run_demo(base)
    except (DemoFailed, ContainerdError) as exc:
        print(f"kybernate demo: FAILED: {exc}\n(logs under {base})", file=sys.stderr)
        return 1
    if args.keep_dir:
        print(f"kept {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    print("demo finished: the restored container went on counting where the checkpoint left it")
    return 0
