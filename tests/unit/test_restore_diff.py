"""Applying a checkpoint's writable layer (rootfs-diff.tar) on restore."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from kybernate.errors import FailedPrecondition
from kybernate.shim.restore import _apply_rootfs_diff


def _diff(image_dir: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> None:
    image_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(image_dir / "rootfs-diff.tar", "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _symlink(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info, None


def _whiteout(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor = info.devminor = 0
    return info, None


def test_files_land_and_whiteouts_delete(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "gone").write_text("deleted in the container")
    _diff(tmp_path / "img", _file("./tmp/count", b"41\n"), _whiteout("./etc/gone"),
          _symlink("./link", "/bin/busybox"))
    _apply_rootfs_diff(tmp_path / "img", rootfs)
    assert (rootfs / "tmp" / "count").read_bytes() == b"41\n"
    assert not (rootfs / "etc" / "gone").exists()
    assert (rootfs / "link").is_symlink()  # symlinks resolve inside the container: kept


@pytest.mark.parametrize("name", ["../escaped", "/abs/escaped", "./a/../../escaped"])
def test_names_leading_out_are_refused(tmp_path: Path, name: str) -> None:
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    _diff(tmp_path / "img", _file(name, b"x"))
    with pytest.raises(FailedPrecondition, match="outside the rootfs"):
        _apply_rootfs_diff(tmp_path / "img", rootfs)
    assert not (tmp_path / "escaped").exists()


def test_a_symlinked_directory_cannot_carry_writes_out(tmp_path: Path) -> None:
    rootfs, outside = tmp_path / "rootfs", tmp_path / "outside"
    rootfs.mkdir()
    outside.mkdir()
    _diff(tmp_path / "img", _symlink("./sneaky", str(outside)), _file("./sneaky/planted", b"x"))
    with pytest.raises(FailedPrecondition, match="through a symlink"):
        _apply_rootfs_diff(tmp_path / "img", rootfs)
    assert not (outside / "planted").exists()
