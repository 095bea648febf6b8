"""The commit protocol: a checkpoint is whole or refused, naming what is wrong."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from kybernate.agent import commit
from kybernate.api import layout
from kybernate.errors import DataLoss, FailedPrecondition, Internal

METADATA = {"id": "c1", "name": "web-1", "host": {"criu_version": "4.2.1"}}


def _staged(tmp_path: Path) -> tuple[Path, Path]:
    staging = commit.staging_path(tmp_path, "c1")
    staging.mkdir()
    (staging / "pages-1.img").write_bytes(os.urandom(70_000))
    (staging / "inventory.img").write_bytes(b"inventory")
    (staging / "sub").mkdir()
    (staging / "sub" / "nested.bin").write_bytes(b"x" * 10)
    return staging, commit.committed_path(tmp_path, "c1")


def test_commit_renames_and_lists_every_file(tmp_path: Path) -> None:
    staging, final = _staged(tmp_path)
    document = commit.commit(staging, final, METADATA)
    assert not staging.exists() and final.is_dir()
    assert set(document["files"]) == {"pages-1.img", "inventory.img", "sub/nested.bin"}
    on_disk = json.loads((final / "metadata.json").read_text())
    assert on_disk == document
    assert on_disk["files"]["inventory.img"] == {"size": 9, "sha256": commit.sha256_file(final / "inventory.img")}
    assert commit.verify(final, criu_version="4.3.0")["name"] == "web-1"


def test_commit_refuses_existing_target(tmp_path: Path) -> None:
    staging, final = _staged(tmp_path)
    final.mkdir()
    with pytest.raises(Internal):
        commit.commit(staging, final, METADATA)
    assert not (staging / "metadata.json").exists()


@pytest.mark.parametrize("damage, named", [
    (lambda d: (d / "pages-1.img").write_bytes(b"\0" * 70_000), "pages-1.img"),  # same size, altered
    (lambda d: (d / "inventory.img").write_bytes(b"inventorY"), "inventory.img"),
    (lambda d: (d / "sub" / "nested.bin").write_bytes(b"short"), "sub/nested.bin"),  # resized
    (lambda d: (d / "inventory.img").unlink(), "inventory.img"),  # missing
    (lambda d: (d / "core-7.img").write_bytes(b"extra"), "core-7.img"),  # extra
])
def test_verify_refuses_tampering_naming_the_file(tmp_path: Path, damage, named: str) -> None:
    staging, final = _staged(tmp_path)
    commit.commit(staging, final, METADATA)
    damage(final)
    with pytest.raises(DataLoss, match=named.replace(".", r"\.")):
        commit.verify(final)


def test_verify_refuses_missing_metadata(tmp_path: Path) -> None:
    staging, _ = _staged(tmp_path)
    with pytest.raises(DataLoss, match="metadata.json is missing"):
        commit.verify(staging)


def test_verify_refuses_corrupt_metadata(tmp_path: Path) -> None:
    staging, final = _staged(tmp_path)
    commit.commit(staging, final, METADATA)
    (final / "metadata.json").write_text("{not json")
    with pytest.raises(DataLoss, match="unreadable"):
        commit.verify(final)


def test_verify_checks_criu_major(tmp_path: Path) -> None:
    staging, final = _staged(tmp_path)
    commit.commit(staging, final, METADATA)
    with pytest.raises(FailedPrecondition, match="CRIU 4.2.1"):
        commit.verify(final, criu_version="5.0")


def test_export_links_on_same_filesystem(tmp_path: Path) -> None:
    staging, final = _staged(tmp_path)
    commit.commit(staging, final, METADATA)
    destination = tmp_path / "containerd-path"
    destination.mkdir()
    commit.export(final, destination)
    assert (destination / "sub" / "nested.bin").read_bytes() == b"x" * 10
    assert (destination / "metadata.json").stat().st_ino == (final / "metadata.json").stat().st_ino
    # What containerd packs verifies as the same checkpoint.
    assert commit.verify(destination)["id"] == "c1"


def test_export_copies_across_filesystems(tmp_path: Path) -> None:
    staging, final = _staged(tmp_path)
    commit.commit(staging, final, METADATA)
    shm = Path("/dev/shm")
    if os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.fail("test needs /dev/shm on another filesystem than the temp dir")
    destination = shm / f"kyb-export-{os.getpid()}"
    try:
        commit.export(final, destination)
        assert (destination / "pages-1.img").stat().st_ino != (final / "pages-1.img").stat().st_ino
        commit.verify(destination)
    finally:
        import shutil
        shutil.rmtree(destination, ignore_errors=True)


# -- complete data survives the agent: the draft ------------------------------------------


def test_a_complete_draft_is_committed_by_recover(tmp_path: Path) -> None:
    staging, final = _staged(tmp_path)
    commit.write_draft(staging, METADATA, commit.DRAFT_COMPLETE, work_dir=tmp_path / "work")
    (staging / layout.METADATA_FILE).write_text('{"half": ')  # the agent died writing it
    document = commit.recover(staging, final)
    assert document is not None and document["name"] == "web-1"
    assert commit.DRAFT_FILE not in document["files"]
    assert sorted(p.name for p in final.iterdir()) == ["inventory.img", "metadata.json", "pages-1.img", "sub"]
    assert commit.verify(final)["id"] == "c1"


def test_a_dump_in_progress_is_recovered_only_if_criu_finished(tmp_path: Path) -> None:
    staging, final = _staged(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    commit.write_draft(staging, METADATA, commit.DRAFT_DUMPING, work_dir=work)
    assert commit.recover(staging, final) is None  # no dump.log: CRIU never finished
    (work / "dump.log").write_text("(00.1) Dumping task\n(00.9) Dumping finished successfully\n")
    assert commit.recover(staging, final) is not None


def test_a_draft_from_another_boot_is_not_trusted(tmp_path: Path) -> None:
    """Unsynced images do not survive a reboot: a draft written before one is refused."""
    staging, final = _staged(tmp_path)
    commit.write_draft(staging, METADATA, commit.DRAFT_COMPLETE, work_dir=tmp_path)
    draft = json.loads((staging / commit.DRAFT_FILE).read_text())
    draft["boot_id"] = "00000000-0000-0000-0000-000000000000"
    (staging / commit.DRAFT_FILE).write_text(json.dumps(draft))
    assert commit.recover(staging, final) is None and not final.exists()


def test_no_draft_no_recovery(tmp_path: Path) -> None:
    staging, final = _staged(tmp_path)
    assert commit.recover(staging, final) is None


# -- metadata from elsewhere never becomes a path outside the checkpoint -------------------


@pytest.mark.parametrize("entry", ["../escape", "/etc/passwd", "a/../../x", "./a", "a//b", "", "a/", "metadata.json",
                                   ".kybernate-draft.json"])
def test_metadata_paths_leading_out_are_refused(tmp_path: Path, entry: str) -> None:
    staging, final = _staged(tmp_path)
    commit.commit(staging, final, METADATA)
    document = json.loads((final / "metadata.json").read_text())
    document["files"][entry] = {"size": 1, "sha256": "0" * 64}
    (final / "metadata.json").write_text(json.dumps(document))
    with pytest.raises(DataLoss):
        commit.verify(final)


@pytest.mark.parametrize("entry", [{"size": -1, "sha256": "0" * 64}, {"size": True, "sha256": "0" * 64},
                                   {"size": 1, "sha256": "xyz"}, {"size": 1}, "nope"])
def test_metadata_entries_need_a_size_and_a_sha256(tmp_path: Path, entry: object) -> None:
    staging, final = _staged(tmp_path)
    commit.commit(staging, final, METADATA)
    document = json.loads((final / "metadata.json").read_text())
    document["files"]["inventory.img"] = entry
    (final / "metadata.json").write_text(json.dumps(document))
    with pytest.raises(DataLoss, match="inventory.img"):
        commit.verify(final)
