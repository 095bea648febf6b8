"""A real `kybernate agent` subprocess for tests: temp config, fake CUDA backend,
temp state directory and local tier, socket in a temp directory.

    with running_agent(workdir) as agent:          # or the `kybernate_agent` fixture
        ...agent.socket, agent.local_tier, agent.fake_events()...

    agent = AgentProcess.in_dir(workdir, "node-a", hold_after_phase={"frozen": 60})
    agent.start(); ...; agent.stop(signal.SIGKILL); agent.start()   # restart keeps state

`stop()` is safe to call twice and after a SIGKILL; fixtures call it in a finally block.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


@dataclass
class AgentProcess:
    """One agent node's files and, while started, its process."""

    root: Path
    socket: Path
    local_tier: Path
    state_dir: Path
    fake_dir: Path
    config_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def in_dir(cls, workdir: Path, node: str = "agent", *, fake_dir: Path | None = None,
               lock_timeout_ms: int = 1500, hold_after_phase: Mapping[str, float] | None = None,
               hold_during_commit: float = 0.0, memory_budget_bytes: int = 0,
               extra_toml: str = "") -> AgentProcess:
        """An agent whose files all live under `workdir`, config written, not started.

        Nodes in the same workdir share the fake CUDA directory unless told otherwise,
        as two agents on one machine would share its GPUs.
        """
        agent = cls(root=workdir, socket=workdir / f"{node}.sock", local_tier=workdir / f"{node}-tier",
                    state_dir=workdir / f"{node}-state", fake_dir=fake_dir or workdir / "fake-cuda",
                    config_path=workdir / f"{node}.toml", log_path=workdir / f"{node}.log")
        agent.write_config(lock_timeout_ms=lock_timeout_ms, hold_after_phase=hold_after_phase,
                           hold_during_commit=hold_during_commit, memory_budget_bytes=memory_budget_bytes,
                           extra_toml=extra_toml)
        return agent

    def write_config(self, *, lock_timeout_ms: int = 1500, hold_after_phase: Mapping[str, float] | None = None,
                     hold_during_commit: float = 0.0, memory_budget_bytes: int = 0,
                     extra_toml: str = "", node_name: str = "") -> None:
        """(Re)write the TOML config; takes effect at the next start()."""
        self.fake_dir.mkdir(parents=True, exist_ok=True)
        holds = ", ".join(f"{phase} = {float(seconds)}" for phase, seconds in (hold_after_phase or {}).items())
        debug = ""
        if holds or hold_during_commit:
            debug = "[debug]\n" + (f"hold_after_phase = {{ {holds} }}\n" if holds else "")
            debug += f"hold_during_commit = {float(hold_during_commit)}\n" if hold_during_commit else ""
        self.config_path.write_text(
            (f'node_name = "{node_name}"\n' if node_name else "")
            + f'socket = "{self.socket}"\n'
            f'state_dir = "{self.state_dir}"\n'
            f'local_tier = "{self.local_tier}"\n'
            "[cuda]\n"
            'backend = "fake"\n'
            f'fake_dir = "{self.fake_dir}"\n'
            f"lock_timeout_ms = {lock_timeout_ms}\n"
            "[checkpoint]\n"
            "min_free_bytes = 0\n"
            f"memory_budget_bytes = {memory_budget_bytes}\n"
            f"{debug}{extra_toml}\n")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the agent and wait until its socket accepts connections."""
        if self.running:
            raise AssertionError(f"agent {self.socket} is already running")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kybernate.agent", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.accepting():  # a killed agent leaves its socket file behind: probe, don't stat
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"agent did not start:\n{self.log()}")
            time.sleep(0.05)

    def accepting(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return True

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the agent with `sig` (SIGKILL simulates a crash); idempotent."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def pause(self) -> None:
        """SIGSTOP: the agent hangs (its socket still accepts, nothing answers)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def cont(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def fake_events(self, *actions: str) -> list[dict[str, Any]]:
        """The fake CUDA backend's event log, optionally only the given actions."""
        path = self.fake_dir / "events.jsonl"
        if not path.exists():
            return []
        events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [e for e in events if not actions or e.get("action") in actions]

    def cuda_state(self, token: str) -> str | None:
        """The fake CUDA state (RUNNING, LOCKED, CHECKPOINTED) of the process marked `token`."""
        record = self.fake_dir / "processes" / f"{token}.json"
        if not record.exists():
            return None
        return str(json.loads(record.read_text()).get("state"))

    def registry_sql(self, statement: str, *params: object) -> list[tuple[Any, ...]]:
        """Run SQL on the agent's registry behind its back (a registry that lags the disk)."""
        import sqlite3

        with contextlib.closing(sqlite3.connect(self.state_dir / "registry.db", isolation_level=None)) as db:
            return list(db.execute(statement, params))

    def committed_checkpoints(self) -> list[Path]:
        """Committed checkpoint directories in the local tier (staging ones excluded)."""
        if not self.local_tier.exists():
            return []
        return sorted(p for p in self.local_tier.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / "metadata.json").exists())

    def settled_checkpoints(self, timeout: float = 60.0) -> list[Path]:
        """`committed_checkpoints` once no checkpoint is still committing: Checkpoint
        returns at EXPORTED (containerd has the images) and the agent's commit (fsync,
        seal) follows once the task runs again."""
        deadline = time.monotonic() + timeout
        while self.registry_sql("SELECT id FROM checkpoints WHERE state = 'staging'"):
            if time.monotonic() > deadline:
                raise AssertionError(f"a checkpoint was still committing after {timeout:.0f}s")
            time.sleep(0.05)
        return self.committed_checkpoints()


def make_workdir(prefix: str = "kyb-agent") -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-{os.getpid()}-"))


@contextmanager
def temporary_workdir(prefix: str = "kyb-agent") -> Iterator[Path]:
    """A fresh directory under /tmp, removed on exit."""
    path = make_workdir(prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def stopped_on_exit(agent: AgentProcess) -> Iterator[AgentProcess]:
    """`agent` as it is; stopped on exit, continued first (a SIGSTOPped agent would
    not see SIGTERM)."""
    try:
        yield agent
    finally:
        agent.cont()
        agent.stop()


@contextmanager
def running_agent(workdir: Path | None = None, node: str = "agent", **config: Any) -> Iterator[AgentProcess]:
    """A started agent, stopped (and its own temp dir removed) on exit, even on failure."""
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(temporary_workdir()) if workdir is None else workdir
        agent = stack.enter_context(stopped_on_exit(AgentProcess.in_dir(root, node, **config)))
        agent.start()
        yield agent


@pytest.fixture
def kybernate_agent() -> Iterator[AgentProcess]:
    """A fresh agent per test, in its own temp directory."""
    with running_agent() as agent:
        yield agent
