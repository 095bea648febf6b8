"""`kybernate doctor` on a node that is ready (a CRI containerd with Kybernate's runtime
entry, the shim on the PATH, a running agent with a writable tier) and on nodes that
miss one piece each: the exit status and the line that names it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import AgentProcess, running_agent, temporary_workdir
from tests.support.containerd import Containerd
from tests.support.cri import cri_settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with temporary_workdir("kyb-doctor") as path:
        yield path


@pytest.fixture(scope="module")
def cri_ctd() -> Iterator[Containerd]:
    """A private containerd whose CRI plugin has Kybernate's runtime entry."""
    base = Path(tempfile.mkdtemp(prefix=f"kyb-doctor-{os.getpid()}-", dir="/tmp"))
    instance = Containerd(base=base, cri=cri_settings(base, f"/kyb-doctor-{os.getpid()}-{uuid.uuid4().hex[:6]}"))
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def agent(workdir: Path) -> Iterator[AgentProcess]:
    with running_agent(workdir, "doctor") as node:
        yield node


def doctor(ctd: Containerd, socket: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # containerd finds the shim on its PATH: the virtualenv's bin, as installed.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "kybernate", "doctor", "--socket", str(socket), "--containerd",
         ctd.release.containerd, "--containerd-config", str(ctd.config), "--address", str(ctd.address),
         "--min-free-bytes", "1", *extra], capture_output=True, text=True, timeout=180, check=False, env=env)


def checks(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    document = json.loads(result.stdout)
    return {check["name"]: check for check in document["checks"]}


def line(result: subprocess.CompletedProcess[str], name: str) -> str:
    found = [text for text in result.stdout.splitlines() if text[6:24].strip() == name]
    assert len(found) == 1, result.stdout
    return found[0]


def test_a_ready_node(cri_ctd: Containerd, agent: AgentProcess) -> None:
    result = doctor(cri_ctd, agent.socket)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("criu", "criu check", "cgroups", "runc", "containerd", "runtime entry", "containerd socket",
                 "shim", "agent", "local tier"):
        assert line(result, name).startswith("OK "), result.stdout
    assert "kybernate" in line(result, "runtime entry")
    assert line(result, "remote tier").startswith("SKIP ")
    assert not [text for text in result.stdout.splitlines() if text.startswith("FAIL")]

    as_json = doctor(cri_ctd, agent.socket, "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["ready"] is True
    assert checks(as_json)["agent"]["status"] == "ok"


def test_no_runtime_entry_in_containerds_config(containerd: Containerd, agent: AgentProcess) -> None:
    # The session's containerd: CRI is off, no handler runs Kybernate.
    result = doctor(containerd, agent.socket, "--json")
    assert result.returncode == 1, result.stdout
    entry = checks(result)["runtime entry"]
    assert entry["status"] == "fail" and "io.containerd.kybernate.v1" in entry["detail"]
    assert "packaging/containerd/kybernate.toml" in entry["fix"]
    assert json.loads(result.stdout)["ready"] is False


def test_agent_down(cri_ctd: Containerd, workdir: Path) -> None:
    stopped = AgentProcess.in_dir(workdir, "doctor-down")
    stopped.start()
    stopped.stop()
    result = doctor(cri_ctd, stopped.socket)
    assert result.returncode == 1
    assert line(result, "agent").startswith("FAIL ") and str(stopped.socket) in line(result, "agent")
    assert "start the node agent" in line(result, "agent")
    assert "not ready" in result.stderr


def test_local_tier_not_writable(cri_ctd: Containerd, agent: AgentProcess) -> None:
    # A read-only filesystem over the agent's tier, as a disk remounted read-only.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "kyb-doctor-ro", str(agent.local_tier)], check=True)
    try:
        result = doctor(cri_ctd, agent.socket)
    finally:
        subprocess.run(["umount", str(agent.local_tier)], check=True)
    assert result.returncode == 1, result.stdout
    tier = line(result, "local tier")
    assert tier.startswith("FAIL ") and str(agent.local_tier) in tier and "Read-only" in tier, tier
    assert line(result, "agent").startswith("OK ")
