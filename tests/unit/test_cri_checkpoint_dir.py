"""Finding containerd 2.x CRI's checkpoint directory from a container's spec, and the
agent's hand-over of CRIU's dump files into a client's work path (hostile input both)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from kybernate.agent import work_path
from kybernate.errors import FailedPrecondition, InvalidArgument
from kybernate.shim.cri_checkpoint import cri_checkpoint_dir, cri_root_of

SANDBOX = "4d8e4ca45785950089425be0a4f4b2e96fcaa34c41f6dc3fa787e26fa6ff1d9f"


def spec_with(root: Path, sandbox: str = SANDBOX, destination: str = "/etc/hosts",
              name: str = "hosts") -> dict[str, Any]:
    return {
        "annotations": {"io.kubernetes.cri.sandbox-id": sandbox},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": destination, "type": "bind",
             "source": str(root / "sandboxes" / sandbox / name)},
        ],
    }


def test_cri_root_comes_from_the_sandbox_files(tmp_path: Path) -> None:
    root = tmp_path / "io.containerd.grpc.v1.cri"
    assert cri_root_of(spec_with(root)) == root
    assert cri_root_of(spec_with(root, destination="/etc/resolv.conf", name="resolv.conf")) == root


@pytest.mark.parametrize("spec", [
    {},
    {"annotations": {"io.kubernetes.cri.sandbox-id": SANDBOX}},
    # a file of another sandbox, or one not CRI's
    spec_with(Path("/var/lib/containerd/io.containerd.grpc.v1.cri"), sandbox="other") | {
        "annotations": {"io.kubernetes.cri.sandbox-id": SANDBOX}},
    spec_with(Path("/var/lib/containerd/io.containerd.grpc.v1.cri"), destination="/etc/passwd"),
    spec_with(Path("/var/lib/containerd/io.containerd.grpc.v1.cri"), sandbox=".."),
    spec_with(Path("relative/root")),
    spec_with(Path("/a/../b")),
])
def test_no_cri_root_without_its_sandbox_files(spec: dict[str, Any]) -> None:
    assert cri_root_of(spec) is None


def test_checkpoint_dir_only_while_cri_made_it(tmp_path: Path) -> None:
    root = tmp_path / "cri"
    spec = spec_with(root)
    assert cri_checkpoint_dir(spec, "c1") is None  # no CheckpointContainer in progress
    directory = root / "containers" / "c1" / "ctrd-checkpoint"
    directory.mkdir(parents=True, mode=0o700)
    directory.chmod(0o700)
    assert cri_checkpoint_dir(spec, "c1") == directory
    assert cri_checkpoint_dir(spec, "../c1") is None
    directory.chmod(0o755)  # CRI makes it 0700: anything else is not its
    assert cri_checkpoint_dir(spec, "c1") is None


def test_checkpoint_dir_symlink_is_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "cri"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (root / "containers" / "c1").mkdir(parents=True)
    (root / "containers" / "c1" / "ctrd-checkpoint").symlink_to(elsewhere)
    assert cri_checkpoint_dir(spec_with(root), "c1") is None


def test_client_work_path_is_validated(tmp_path: Path) -> None:
    assert work_path.client_work_path("", "c1") is None
    assert work_path.client_work_path(str(tmp_path), "c1") == tmp_path
    with pytest.raises(InvalidArgument):
        work_path.client_work_path("relative", "c1")
    with pytest.raises(InvalidArgument):
        work_path.client_work_path(f"{tmp_path}/../x", "c1")
    with pytest.raises(FailedPrecondition, match="does not exist|No such"):
        work_path.client_work_path(str(tmp_path / "missing"), "c1")
    (tmp_path / "link").symlink_to(tmp_path)
    with pytest.raises(FailedPrecondition, match="symlink"):
        work_path.client_work_path(str(tmp_path / "link"), "c1")
    owned = tmp_path / "owned"
    owned.mkdir()
    os.chown(owned, 65534, 65534)
    with pytest.raises(FailedPrecondition, match="not owned by root"):
        work_path.client_work_path(str(owned), "c1")


def test_hand_over_copies_the_dump_files_without_following_symlinks(tmp_path: Path) -> None:
    work, target = tmp_path / "work", tmp_path / "target"
    work.mkdir()
    target.mkdir()
    (work / "dump.log").write_text("Dumping finished successfully\n")
    (work / "stats-dump").write_bytes(b"\x01\x02")
    (work / "other").write_text("not handed over")
    assert work_path.hand_over(work, target) == ["dump.log", "stats-dump"]
    assert (target / "dump.log").read_text() == "Dumping finished successfully\n"
    assert sorted(p.name for p in target.iterdir()) == ["dump.log", "stats-dump"]

    victim = tmp_path / "victim"
    victim.write_text("untouched")
    (target / "dump.log").unlink()
    (target / "dump.log").symlink_to(victim)
    assert work_path.hand_over(work, target) == ["stats-dump"]
    assert victim.read_text() == "untouched"
