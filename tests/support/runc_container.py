"""A runc container driven directly (no containerd) for the agent's tests: its own
runc root and cgroup, a counter in shell memory written to /tmp/count each tick, and
one long-lived "CUDA" process (the fake backend's environment marker, set on that
process alone so the counter's short-lived children are not CUDA processes). Plus
the few calls the tests make of the agent's Checkpoint stream."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

from kybernate.api.client import AgentClient
from kybernate.errors import KybernateError
from kybernate.protos import agent_pb2

from tests.support.agent import AgentProcess
from tests.support.bundle import make_bundle

COUNTER = (
    "KYBERNATE_FAKE_CUDA=$CUDA_TOKEN sleep 1000000 & "
    # Written aside and renamed: a dump that freezes the shell between the truncate and
    # the write of a plain `>` would leave the file empty.
    "i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.1; done"
)
# A loopback TCP connection inside the container: CRIU refuses it without tcp_established.
TCP_PAIR = (
    "(sleep 1000000 | nc -l -p 9000 >/dev/null) & sleep 0.3; "
    "(sleep 1000000 | nc 127.0.0.1 9000 >/dev/null) & "
)

class Container:
    """A runc container with its own runc root and cgroup; stdio are pipes we hold."""

    def __init__(self, workdir: Path, prelude: str = "", *, overlay: bool = False) -> None:
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.id = f"kyb-agent-{tag}"
        self.runc_root = workdir / "runc-root"
        self.bundle = workdir / "bundle"
        self.token = f"tok-{tag}"
        make_bundle(self.bundle, ["sh", "-c", prelude + COUNTER], cgroups_path=f"/kyb-agent-test-{tag}")
        spec = json.loads((self.bundle / "config.json").read_text())
        spec["process"]["env"].append(f"CUDA_TOKEN={self.token}")
        (self.bundle / "config.json").write_text(json.dumps(spec))
        self._pipes: list[int] = []
        self.pid = 0
        self.upper: Path | None = None
        if overlay:  # as containerd's snapshotter does: the rootfs is an overlay mount
            lower, self.upper, work = (workdir / "lower", workdir / "upper", workdir / "overlay-work")
            (self.bundle / "rootfs").rename(lower)
            for d in (self.upper, work, self.bundle / "rootfs"):
                d.mkdir()
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir={lower},upperdir={self.upper},workdir={work}",
                            str(self.bundle / "rootfs")], check=True)

    def _stdio(self) -> tuple[int, int, int]:
        stdin_r, stdin_w = os.pipe()
        out_r, out_w = os.pipe()
        self._pipes += [stdin_r, stdin_w, out_r, out_w]
        return stdin_r, out_w, out_w

    def runc(self, *args: str, stdio: tuple[int, int, int] | None = None) -> subprocess.CompletedProcess[bytes]:
        stdin, stdout, stderr = stdio or (subprocess.DEVNULL, subprocess.PIPE, subprocess.PIPE)
        return subprocess.run(["runc", "--root", str(self.runc_root), *args], stdin=stdin, stdout=stdout,
                              stderr=stderr, timeout=60, check=False)

    def run(self) -> None:
        pid_file = self.bundle.parent / "init.pid"
        result = self.runc("run", "-d", "--pid-file", str(pid_file), "--bundle", str(self.bundle), self.id,
                            stdio=self._stdio())
        assert result.returncode == 0, f"runc run failed: {result.stderr!r}"
        self.pid = int(pid_file.read_text())

    def restore(self, image_dir: Path) -> None:
        pid_file = self.bundle.parent / "restored.pid"
        work = self.bundle.parent / "restore-work"
        work.mkdir(exist_ok=True)
        stdio = self._stdio()
        log = self.bundle.parent / "restore.out"
        with log.open("wb") as out:
            result = subprocess.run(
                ["runc", "--root", str(self.runc_root), "restore", "--detach", "--image-path", str(image_dir),
                 "--work-path", str(work), "--bundle", str(self.bundle), "--pid-file", str(pid_file), self.id],
                stdin=stdio[0], stdout=stdio[1], stderr=out, timeout=120, check=False)
        restore_log = work / "restore.log"
        assert result.returncode == 0, (
            f"runc restore failed: {log.read_text()}\n{restore_log.read_text() if restore_log.exists() else ''}")
        self.pid = int(pid_file.read_text())

    def status(self) -> str:
        result = self.runc("state", self.id)
        return json.loads(result.stdout)["status"] if result.returncode == 0 else "absent"

    def count(self) -> int:
        text = (self.bundle / "rootfs" / "tmp" / "count").read_text().strip()
        return int(text) if text else 0

    def wait_count(self, at_least: int, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.count()
            except (OSError, ValueError):
                value = -1
            if value >= at_least:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"counter stuck at {value}, wanted {at_least}")
            time.sleep(0.05)

    def delete(self) -> None:
        self.runc("delete", "--force", self.id)

    def close(self) -> None:
        # A frozen container cannot be killed until thawed; force-delete thaws it.
        self.delete()
        for fd in self._pipes:
            os.close(fd)
        self._pipes = []
        if self.upper is not None:
            subprocess.run(["umount", "-l", str(self.bundle / "rootfs")], check=False)
            self.upper = None


def checkpoint_request(box: Container, *, exit: bool, name: str, destination: Path | None = None,
             **options: object) -> agent_pb2.CheckpointRequest:
    return agent_pb2.CheckpointRequest(
        container_id=box.id, namespace="default", bundle=str(box.bundle), runc_root=str(box.runc_root),
        init_pid=box.pid, destination=str(destination or ""), name=name, image_ref="busybox:test",
        labels={"test": "agent-pipeline"},
        options=agent_pb2.CheckpointOptions(exit=exit, **options))


async def stream_checkpoint(agent: AgentProcess, request: agent_pb2.CheckpointRequest
                      ) -> tuple[list[agent_pb2.CheckpointProgress], KybernateError | None]:
    seen: list[agent_pb2.CheckpointProgress] = []
    async with AgentClient(agent.socket) as client:
        try:
            async for progress in client.checkpoint(request, timeout=120):
                seen.append(progress)
        except KybernateError as exc:
            return seen, exc
    return seen, None


def phase_names(seen: list[agent_pb2.CheckpointProgress]) -> list[str]:
    return [agent_pb2.Phase.Name(p.phase) for p in seen]
