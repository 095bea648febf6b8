"""Applying a checkpoint's writable layer (rootfs-diff.tar) on restore: the archive is
hostile input, applied chroot()ed into the container's root (needs root, as the shim).
Every escape attempt either is refused or lands inside the root; nothing is ever
written outside it."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from kybernate.errors import FailedPrecondition
from kybernate.shim.rootfs_diff import apply_saved_layer


def _diff(image_dir: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> None:
    image_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(image_dir / "rootfs-diff.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _dir(name: str, **pax: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    info.pax_headers = dict(pax)
    return info, None


def _symlink(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info, None


def _hardlink(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE
    info.linkname = target
    return info, None


def _device(name: str, major: int, minor: int) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = major, minor
    return info, None


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(image dir, container root, a host directory outside the root)."""
    rootfs, outside = tmp_path / "rootfs", tmp_path / "outside"
    rootfs.mkdir()
    outside.mkdir()
    (outside / "precious").write_text("host data")
    return tmp_path / "img", rootfs, outside


def _untouched(outside: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["precious"]
    assert (outside / "precious").read_text() == "host data"


def test_files_land_and_whiteouts_delete(layout: tuple[Path, Path, Path]) -> None:
    image, rootfs, _ = layout
    (rootfs / "etc").mkdir()
    (rootfs / "etc" / "gone").write_text("deleted in the container")
    _diff(image, _file("./tmp/count", b"41\n"), _device("./etc/gone", 0, 0),
          _symlink("./link", "/bin/busybox"), _hardlink("./tmp/again", "./tmp/count"))
    apply_saved_layer(image, rootfs)
    assert (rootfs / "tmp" / "count").read_bytes() == b"41\n"
    assert not (rootfs / "etc" / "gone").exists()
    assert os.readlink(rootfs / "link") == "/bin/busybox"  # resolves inside the container: kept
    assert (rootfs / "tmp" / "again").stat().st_ino == (rootfs / "tmp" / "count").stat().st_ino


@pytest.mark.parametrize("name", ["../escaped", "/abs/escaped", "./a/../../escaped"])
def test_names_leading_out_are_refused(layout: tuple[Path, Path, Path], name: str) -> None:
    image, rootfs, outside = layout
    _diff(image, _file(name, b"x"))
    with pytest.raises(FailedPrecondition, match="outside the container's root"):
        apply_saved_layer(image, rootfs)
    assert not (image.parent / "escaped").exists()
    _untouched(outside)


def test_a_hardlink_leading_out_is_refused(layout: tuple[Path, Path, Path]) -> None:
    image, rootfs, outside = layout
    _diff(image, _hardlink("./stolen", "../outside/precious"))
    with pytest.raises(FailedPrecondition, match="outside the container's root"):
        apply_saved_layer(image, rootfs)
    assert not (rootfs / "stolen").exists()
    _untouched(outside)


def test_a_symlink_in_the_archive_cannot_carry_writes_out(layout: tuple[Path, Path, Path]) -> None:
    image, rootfs, outside = layout
    _diff(image, _symlink("./sneaky", str(outside)), _file("./sneaky/planted", b"x"),
          _file("./sneaky/precious", b"overwritten"))
    # Inside the chroot the symlink's target is a path in the container's root, which
    # does not exist: the write is refused (it could only ever land inside).
    with pytest.raises(FailedPrecondition, match="sneaky"):
        apply_saved_layer(image, rootfs)
    _untouched(outside)
    assert os.readlink(rootfs / "sneaky") == str(outside)


def test_a_symlink_in_the_lower_layer_cannot_carry_writes_out(layout: tuple[Path, Path, Path]) -> None:
    """The image's own lower layer has /data and /conf/precious as symlinks to host
    paths: the diff's entries replace them, as overlayfs's upper layer would."""
    image, rootfs, outside = layout
    (rootfs / "data").symlink_to(outside)
    (rootfs / "conf").mkdir()
    (rootfs / "conf" / "precious").symlink_to(outside / "precious")
    _diff(image, _file("./conf/precious", b"overwritten"), _dir("./data"), _file("./data/planted", b"x"))
    apply_saved_layer(image, rootfs)
    _untouched(outside)
    assert not (rootfs / "conf" / "precious").is_symlink()
    assert (rootfs / "conf" / "precious").read_bytes() == b"overwritten"
    assert not (rootfs / "data").is_symlink()
    assert (rootfs / "data" / "planted").read_bytes() == b"x"


def test_a_lower_symlink_without_its_directory_entry_is_refused(layout: tuple[Path, Path, Path]) -> None:
    image, rootfs, outside = layout
    (rootfs / "data").symlink_to(outside)
    _diff(image, _file("./data/planted", b"x"))
    with pytest.raises(FailedPrecondition):
        apply_saved_layer(image, rootfs)
    _untouched(outside)


def test_device_nodes_are_refused(layout: tuple[Path, Path, Path]) -> None:
    image, rootfs, outside = layout
    _diff(image, _device("./dev/sda-again", 8, 0))
    with pytest.raises(FailedPrecondition, match="device node"):
        apply_saved_layer(image, rootfs)
    assert not (rootfs / "dev" / "sda-again").exists()
    _untouched(outside)


def test_an_opaque_directory_hides_the_lower_contents(layout: tuple[Path, Path, Path]) -> None:
    image, rootfs, _ = layout
    (rootfs / "cache").mkdir()
    (rootfs / "cache" / "old").write_text("from the image")
    _diff(image, _dir("./cache", **{"SCHILY.xattr.trusted.overlay.opaque": "y"}), _file("./cache/new", b"n"))
    apply_saved_layer(image, rootfs)
    assert sorted(p.name for p in (rootfs / "cache").iterdir()) == ["new"]


def test_a_directory_keeps_what_the_lower_layer_has(layout: tuple[Path, Path, Path]) -> None:
    image, rootfs, _ = layout
    (rootfs / "etc").mkdir()
    (rootfs / "etc" / "hosts").write_text("lower")
    _diff(image, _dir("./etc"), _file("./etc/added", b"a"))
    apply_saved_layer(image, rootfs)
    assert sorted(p.name for p in (rootfs / "etc").iterdir()) == ["added", "hosts"]


def test_a_checkpoint_without_a_diff_changes_nothing(layout: tuple[Path, Path, Path]) -> None:
    image, rootfs, _ = layout
    image.mkdir()
    apply_saved_layer(image, rootfs)
    assert list(rootfs.iterdir()) == []
