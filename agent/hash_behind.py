"""Hash CRIU's pages images while CRIU is still writing them.

A leave-running checkpoint through containerd keeps the container paused until
Checkpoint returns, and metadata.json (every file's sha256) must be in containerd's
path by then. Hashing 2 GiB of pages after the dump would add ~1.7 s to that stall;
hashed behind CRIU's writes (on the other core, from the page cache CRIU just filled)
only the tail that CRIU wrote last is left when the dump ends.

Only `pages-*.img` are followed: CRIU writes them front to back and never rewrites
what it wrote. Everything else (small, and some of it rewritten) is hashed after
the dump. `finish()` reads each followed file to its final end; should a file's size
ever shrink under the reader, its digest is discarded and it is hashed again whole,
so a wrong guess about CRIU costs time, never a wrong digest.

One thread; hashlib releases the GIL while it hashes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

FOLLOWED = "pages-*.img"
CHUNK_BYTES = 4 << 20
#: How long the follower sleeps when it has caught up with CRIU.
IDLE_S = 0.005


class _Followed:
    __slots__ = ("digest", "fd", "offset")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.offset = 0
        self.digest = hashlib.sha256()


class HashBehind:
    """sha256 of the pages images in `directory`, computed while they are written."""

    def __init__(self, directory: Path, pattern: str = FOLLOWED) -> None:
        self._directory = directory
        self._pattern = pattern
        self._files: dict[str, _Followed] = {}
        self._spoiled: set[str] = set()
        self._writer_done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kyb-hash-behind", daemon=True)
        self._error: BaseException | None = None

    def start(self) -> HashBehind:
        self._thread.start()
        return self

    def _discover(self) -> None:
        try:
            names = os.listdir(self._directory)
        except FileNotFoundError:
            return
        for name in names:
            if name not in self._files and fnmatch.fnmatchcase(name, self._pattern):
                try:
                    fd = os.open(self._directory / name, os.O_RDONLY | os.O_NOFOLLOW)
                except OSError:
                    continue
                self._files[name] = _Followed(fd)

    def _catch_up(self, name: str, followed: _Followed) -> bool:
        """Hash what is there now; whether anything was read."""
        size = os.fstat(followed.fd).st_size
        if size < followed.offset:
            self._spoiled.add(name)  # not append-only after all: hash it again at the end
            return False
        read_any = False
        while followed.offset < size:
            data = os.pread(followed.fd, min(CHUNK_BYTES, size - followed.offset), followed.offset)
            if not data:
                break
            followed.digest.update(data)
            followed.offset += len(data)
            read_any = True
        return read_any

    def _run(self) -> None:
        try:
            while not self._writer_done.is_set():
                self._discover()
                progressed = False
                for name, followed in list(self._files.items()):
                    if name not in self._spoiled:
                        progressed |= self._catch_up(name, followed)
                if not progressed:
                    self._writer_done.wait(IDLE_S)
        except BaseException as exc:  # noqa: BLE001 - re-raised by finish()
            self._error = exc

    def finish(self) -> dict[str, tuple[int, str]]:
        """Once CRIU has exited: {name: (size, sha256)} of every followed file, complete."""
        self._writer_done.set()
        self._thread.join()
        try:
            if self._error is not None:
                raise self._error
            self._discover()
            result: dict[str, tuple[int, str]] = {}
            for name, followed in self._files.items():
                if name not in self._spoiled:
                    self._catch_up(name, followed)
                current = os.lstat(self._directory / name)
                size = current.st_size
                if current.st_ino != os.fstat(followed.fd).st_ino:
                    self._spoiled.add(name)  # replaced under the reader
                if name in self._spoiled or followed.offset != size:
                    log.warning("hash behind CRIU: %s was not written front to back; hashing it again", name)
                    with open(self._directory / name, "rb") as f:
                        result[name] = (size, hashlib.file_digest(f, "sha256").hexdigest())
                else:
                    result[name] = (size, followed.digest.hexdigest())
            return result
        finally:
            self.close()

    def close(self) -> None:
        """Stop following (a failed dump) and release the files."""
        self._writer_done.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        for followed in self._files.values():
            try:
                os.close(followed.fd)
            except OSError:
                pass
        self._files.clear()
