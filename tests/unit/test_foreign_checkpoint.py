"""Checks on a checkpoint Kybernate did not make (runc's images), each a hostile input:
what passes, and every way a tampered or incomplete one is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from kybernate.agent.foreign_checkpoint import (
    IMG_COMMON_MAGIC,
    INVENTORY_MAGIC,
    PAGE_SIZE,
    PAGEMAP_MAGIC,
    PSTREE_MAGIC,
    verify_foreign,
)
from kybernate.errors import DataLoss, FailedPrecondition

CORE_MAGIC = 0x55348354


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _entry(*fields: tuple[int, int]) -> bytes:
    body = b"".join(_varint(number << 3) + _varint(value) for number, value in fields)
    return _u32(len(body)) + body


def runc_images(directory: Path, pages: int = 3) -> Path:
    """A directory laid out as CRIU writes one: inventory, pstree, a core image, a
    pagemap listing `pages` present pages (CRIU 4: counted in field 5) and its pages file."""
    directory.mkdir()
    (directory / "inventory.img").write_bytes(_u32(INVENTORY_MAGIC) + _entry((1, 2)))
    (directory / "pstree.img").write_bytes(_u32(IMG_COMMON_MAGIC) + _u32(PSTREE_MAGIC) + _entry((1, 1)))
    (directory / "core-1.img").write_bytes(_u32(IMG_COMMON_MAGIC) + _u32(CORE_MAGIC) + _entry((1, 1)))
    (directory / "pagemap-1.img").write_bytes(
        _u32(IMG_COMMON_MAGIC) + _u32(PAGEMAP_MAGIC) + _entry((1, 1))
        + _entry((1, 0x400000), (2, 0), (4, 4), (5, pages - 1)) + _entry((1, 0x800000), (2, 1)))
    (directory / "pages-1.img").write_bytes(b"\x90" * PAGE_SIZE * pages)
    (directory / "descriptors.json").write_text('["/dev/null"]')
    (directory / "tmpfs-dev-52.tar.gz.img").write_bytes(b"\x1f\x8b")
    return directory


def test_a_complete_runc_dump_passes_with_a_manifest(tmp_path: Path) -> None:
    images = runc_images(tmp_path / "checkpoint")
    (tmp_path / "dump.log").write_text("(00.1) Dumping finished successfully\n")
    metadata = verify_foreign(images)
    assert metadata["format"] == "foreign" and metadata["cuda"] == {}
    assert metadata["files"]["pages-1.img"]["size"] == 3 * PAGE_SIZE
    assert len(metadata["files"]["pages-1.img"]["sha256"]) == 64


def test_a_truncated_or_padded_pages_file_is_refused(tmp_path: Path) -> None:
    images = runc_images(tmp_path / "checkpoint")
    with (images / "pages-1.img").open("r+b") as f:
        f.truncate(2 * PAGE_SIZE)
    with pytest.raises(DataLoss, match="pages-1.img holds 8192 bytes, its pagemap lists 3 pages"):
        verify_foreign(images)
    with (images / "pages-1.img").open("ab") as f:
        f.write(b"\0" * 2 * PAGE_SIZE)
    with pytest.raises(DataLoss, match="pages-1.img holds"):
        verify_foreign(images)


@pytest.mark.parametrize("tamper, message", [
    (lambda d: (d / "inventory.img").unlink(), "inventory.img is missing"),
    (lambda d: (d / "pstree.img").unlink(), "pstree.img is missing"),
    (lambda d: (d / "core-1.img").write_bytes(b"\0" * 16), "core-1.img does not carry CRIU's image magic"),
    (lambda d: (d / "inventory.img").write_bytes(b"\0" * 16), "inventory magic"),
    (lambda d: (d / "pagemap-1.img").write_bytes(_u32(IMG_COMMON_MAGIC) + _u32(PAGEMAP_MAGIC) + b"\xff\xff"),
     "not a readable pagemap"),
    (lambda d: (d / "pages-9.img").write_bytes(b"x"), "pages-9.img belongs to no pagemap"),
    (lambda d: (d / "evil.sh").write_text("x"), "not a file CRIU or runc writes"),
    (lambda d: (d / "sub").mkdir(), "not a regular file"),
    (lambda d: os.symlink("/etc/shadow", d / "fs-1.img"), "not a regular file"),
    (lambda d: os.mkfifo(d / "fifo-1.img"), "not a regular file"),
])
def test_tampered_images_are_refused(tmp_path: Path, tamper, message: str) -> None:  # type: ignore[no-untyped-def]
    images = runc_images(tmp_path / "checkpoint")
    tamper(images)
    with pytest.raises(DataLoss, match=message):
        verify_foreign(images)


def test_an_unfinished_dump_log_beside_it_is_refused(tmp_path: Path) -> None:
    images = runc_images(tmp_path / "checkpoint")
    (tmp_path / "dump.log").write_text("(00.1) Error (criu/cr-dump.c:2093): Dumping FAILED.\n")
    with pytest.raises(FailedPrecondition, match="did not finish"):
        verify_foreign(images)
    (tmp_path / "dump.log").unlink()
    os.symlink("/etc/passwd", tmp_path / "dump.log")
    with pytest.raises(DataLoss, match="dump.log"):
        verify_foreign(images)
