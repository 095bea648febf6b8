"""Hashing CRIU's pages images while they are written gives the digest of the whole
file, however the writes and reads interleave; a file rewritten under the reader is
hashed again rather than trusted."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

from kybernate.agent.hash_behind import HashBehind


def _writer(path: Path, chunks: list[bytes], pause_s: float) -> threading.Thread:
    def write() -> None:
        with path.open("wb") as f:
            for chunk in chunks:
                f.write(chunk)
                f.flush()
                time.sleep(pause_s)

    thread = threading.Thread(target=write)
    thread.start()
    return thread


def test_digest_of_files_appended_while_followed(tmp_path: Path) -> None:
    first = [os.urandom(300_000) for _ in range(20)]
    second = [os.urandom(70_001) for _ in range(7)]
    hasher = HashBehind(tmp_path).start()
    writers = [_writer(tmp_path / "pages-1.img", first, 0.003), _writer(tmp_path / "pages-2.img", second, 0.005)]
    (tmp_path / "core-1.img").write_bytes(b"not followed")
    for writer in writers:
        writer.join()
    result = hasher.finish()
    assert result == {
        "pages-1.img": (len(b"".join(first)), hashlib.sha256(b"".join(first)).hexdigest()),
        "pages-2.img": (len(b"".join(second)), hashlib.sha256(b"".join(second)).hexdigest()),
    }


def test_a_file_rewritten_under_the_reader_is_hashed_again(tmp_path: Path) -> None:
    path = tmp_path / "pages-1.img"
    path.write_bytes(os.urandom(1 << 20))
    hasher = HashBehind(tmp_path).start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not hasher._files:  # followed once discovered
        time.sleep(0.01)
    time.sleep(0.05)
    final = os.urandom(1000)
    path.write_bytes(final)  # truncated and rewritten: not append-only
    assert hasher.finish() == {"pages-1.img": (1000, hashlib.sha256(final).hexdigest())}


def test_a_file_replaced_by_rename_is_hashed_again(tmp_path: Path) -> None:
    path = tmp_path / "pages-1.img"
    path.write_bytes(os.urandom(1 << 16))
    hasher = HashBehind(tmp_path).start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not hasher._files:
        time.sleep(0.01)
    replacement = tmp_path / "new"
    final = os.urandom((1 << 16) + 5)
    replacement.write_bytes(final)
    os.rename(replacement, path)
    assert hasher.finish() == {"pages-1.img": (len(final), hashlib.sha256(final).hexdigest())}
