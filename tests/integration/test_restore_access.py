"""Nobody restores what is not theirs, through a real containerd, shim, agent, runc and
CRIU (DESIGN.md, "Who may restore what").

- A checkpoint taken in one containerd namespace restores by `io.kybernate.restore-from`
  only in that namespace, by name, namespace/name or id; another namespace is refused
  with PermissionDenied and nothing runs, until an operator shares it with
  `kybernate checkpoint share` (and after `--revoke`, refused again).
- Host directories are accepted only under the agent's `[restore] allowed_roots`,
  symlinks resolved, never the agent's own tier.
- A `metadata.json` that lists a path leading out of its directory is refused before
  anything is read or written.
- A checkpoint with no seal (a copy in a host directory) is restored while its pages
  images are hashed: CRIU holds the restored tasks in its post-restore step until the
  hash matched; an altered pages image makes CRIU kill them, Start fails naming the
  file, and nothing restored is left running.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kybernate.cli.checkpoint import checkpoint_share_main
from kybernate.shim.verification_gate import SCRIPT_NAME

from tests.support.agent import AgentProcess, running_agent, temporary_workdir
from tests.support.containerd import Containerd
from tests.support.counters import checkpoint, container_names, run
from tests.support.images import import_image
from tests.support.tasks import private_containerd, remove_container

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with temporary_workdir("kyb-access") as path:
        yield path


@pytest.fixture(scope="module")
def golden(workdir: Path) -> Path:
    """The one host directory the agent accepts checkpoints from."""
    path = workdir / "golden"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def agent(workdir: Path, golden: Path) -> Iterator[AgentProcess]:
    with running_agent(workdir, "node", extra_toml=f'[restore]\nallowed_roots = ["{golden}"]\n') as node:
        yield node


@pytest.fixture(scope="module")
def ctd(busybox_archive: Path) -> Iterator[Containerd]:
    with private_containerd(Containerd(), busybox_archive) as instance:
        yield instance


@pytest.fixture(scope="module")
def other(ctd: Containerd, busybox_archive: Path) -> Iterator[Containerd]:
    """The same containerd, seen from a second namespace with its own busybox image."""
    view = copy.copy(ctd)
    view.namespace = f"{ctd.namespace}-other"
    import_image(view, busybox_archive)
    try:
        yield view
    finally:
        for line in view.ctr("containers", "ls", "-q").stdout.split():
            remove_container(view, line)
        view._remove_namespace_cgroups()


@pytest.fixture
def names(ctd: Containerd, other: Containerd) -> Iterator[Callable[[str], str]]:
    with container_names(ctd, other) as make:
        yield make


def assert_refused(ctd: Containerd, agent: AgentProcess, container_id: str, restore_from: str,
                   *needles: str) -> None:
    err = run(ctd, agent, container_id, restore_from=restore_from, check=False)
    assert err, f"the restore of {restore_from} in namespace {ctd.namespace} was not refused"
    for needle in needles:
        assert needle in err, err
    assert ctd.task_status(container_id) in (None, "STOPPED", "CREATED", "UNKNOWN")
    remove_container(ctd, container_id)


def test_a_checkpoint_restores_only_where_it_was_taken_or_shared(
        ctd: Containerd, other: Containerd, agent: AgentProcess, names: Callable[[str], str]) -> None:
    source = names("bars")
    run(ctd, agent, source)
    taken = checkpoint(ctd, agent, source)
    qualified = f"{ctd.namespace}/{taken['name']}"

    # Another namespace: by namespace/name and by id, refused, saying why; by bare name
    # it finds nothing of its own.
    assert_refused(other, agent, names("other"), qualified, "refused", "not shared", ctd.namespace)
    assert_refused(other, agent, names("other"), taken["id"], "refused", "not shared")
    assert_refused(other, agent, names("other"), taken["name"], "not in the registry of namespace")

    # Its own namespace restores it, by name.
    own = names("own")
    run(ctd, agent, own, restore_from=taken["name"])

    # Shared on purpose (a golden snapshot): the other namespace restores it too.
    assert checkpoint_share_main(["--socket", str(agent.socket), qualified, "--with", other.namespace]) == 0
    shared = names("shared")
    run(other, agent, shared, restore_from=qualified)
    # And taken back.
    assert checkpoint_share_main(["--socket", str(agent.socket), qualified, "--with", other.namespace,
                                  "--revoke"]) == 0
    assert_refused(other, agent, names("revoked"), qualified, "not shared")


def test_host_directories_only_under_the_allowed_roots(
        ctd: Containerd, agent: AgentProcess, golden: Path, workdir: Path, names: Callable[[str], str]) -> None:
    source = names("dir")
    run(ctd, agent, source)
    taken = checkpoint(ctd, agent, source)
    committed = Path(taken["local_path"])

    outside = workdir / "elsewhere" / taken["id"]
    shutil.copytree(committed, outside)
    assert_refused(ctd, agent, names("outside"), str(outside), "allowed_roots")
    sneaky = golden / "sneaky"
    sneaky.symlink_to(outside)  # under the root by name, outside it for real
    assert_refused(ctd, agent, names("sneaky"), str(sneaky), "allowed_roots")
    assert_refused(ctd, agent, names("tier"), str(committed), "by name")

    inside = golden / taken["id"]
    shutil.copytree(committed, inside)
    run(ctd, agent, names("inside"), restore_from=str(inside))


def test_metadata_leading_out_of_its_directory_is_refused(
        ctd: Containerd, agent: AgentProcess, golden: Path, workdir: Path, names: Callable[[str], str]) -> None:
    source = names("meta")
    run(ctd, agent, source)
    taken = checkpoint(ctd, agent, source)
    planted = golden / "planted"
    for escape in ("../planted", "/etc/kybernate-planted", "a/../../planted"):
        hostile = golden / f"hostile-{uuid.uuid4().hex[:6]}"
        shutil.copytree(taken["local_path"], hostile)
        metadata = json.loads((hostile / "metadata.json").read_text())
        metadata["files"][escape] = {"size": 1, "sha256": "0" * 64}
        (hostile / "metadata.json").write_text(json.dumps(metadata))
        assert_refused(ctd, agent, names("hostile"), str(hostile), "outside the checkpoint directory")
    assert not planted.exists() and not Path("/etc/kybernate-planted").exists()
    for bad in ("../../etc", "a/b/c", "-x"):
        assert_refused(ctd, agent, names("badref"), bad, "refused")


# ---- verification while CRIU restores: a copy with no seal -------------------------------

COUNT_BEFORE_CHECKPOINT = 40  # the counter ticks every 0.1 s: a restart would need 4 s


def count(ctd: Containerd, container_id: str) -> int:
    result = ctd.ctr("task", "exec", "--exec-id", f"c{uuid.uuid4().hex[:6]}", container_id, "cat", "/tmp/count",
                     timeout=30)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip() or 0)


def copy_of_a_checkpoint(ctd: Containerd, agent: AgentProcess, golden: Path, source: str) -> Path:
    """A counter checkpointed once it counted past COUNT_BEFORE_CHECKPOINT, copied into
    the allowed root (a copy: no seal), the source removed."""
    run(ctd, agent, source)
    deadline = time.monotonic() + 60
    while count(ctd, source) < COUNT_BEFORE_CHECKPOINT:
        assert time.monotonic() < deadline, "the counter does not count"
        time.sleep(0.2)
    taken = checkpoint(ctd, agent, source)
    remove_container(ctd, source)
    copy = golden / f"copy-{taken['id']}"
    shutil.copytree(taken["local_path"], copy)
    return copy


def restore_log(ctd: Containerd, container_id: str) -> str:
    return (ctd.state / "io.containerd.runtime.v2.task" / ctd.namespace / container_id / "criu-restore"
            / "restore.log").read_text(errors="replace")


def test_an_unsealed_copy_restores_with_its_tasks_held_until_the_pages_verified(
        ctd: Containerd, agent: AgentProcess, golden: Path, names: Callable[[str], str]) -> None:
    copy = copy_of_a_checkpoint(ctd, agent, golden, names("src"))
    restored = names("held")
    run(ctd, agent, restored, restore_from=str(copy))
    assert count(ctd, restored) >= COUNT_BEFORE_CHECKPOINT  # its memory, not a fresh start
    assert SCRIPT_NAME in restore_log(ctd, restored)  # CRIU ran the gate at post-restore


def test_an_altered_pages_image_kills_the_restored_tasks_and_names_the_file(
        ctd: Containerd, agent: AgentProcess, golden: Path, names: Callable[[str], str]) -> None:
    copy = copy_of_a_checkpoint(ctd, agent, golden, names("src"))
    pages = max(copy.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    data = bytearray(pages.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    pages.chmod(0o644)
    pages.write_bytes(bytes(data))

    refused = names("tampered")
    err = run(ctd, agent, refused, restore_from=str(copy), check=False)
    assert f"{pages.name} failed its sha256 check" in err, err
    assert "killed" in err, err
    assert ctd.task_status(refused) in (None, "STOPPED", "CREATED", "UNKNOWN")
    log = restore_log(ctd, refused)
    assert SCRIPT_NAME in log and "post-restore script" in log, log[-2000:]
    cgroup_procs = list(Path("/sys/fs/cgroup/pids").glob(f"**/{refused}/cgroup.procs"))
    assert all(not p.read_text().split() for p in cgroup_procs), "a restored process survived"
