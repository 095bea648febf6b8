"""runc's `descriptors.json`: what a checkpointed init had on fds 0, 1 and 2.

`runc restore` reads it from the image directory and, for every entry that is a pipe
("pipe:[INODE]"), tells CRIU to plug its own stdio fd in place of that pipe. Writing it
the way runc does lets stock runc restore images that Kybernate dumped directly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DESCRIPTORS_FILE = "descriptors.json"
_STDIO_FDS = (0, 1, 2)


def stdio_targets(pid: int) -> list[str]:
    """The readlink targets of /proc/<pid>/fd/0..2, as runc records them.

    A closed fd is recorded as "" (runc's restore only acts on pipe entries).
    """
    targets: list[str] = []
    for fd in _STDIO_FDS:
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}"):
                raise
            targets.append("")
    return targets


def write_descriptors(images_dir: Path, pid: int) -> None:
    """Write descriptors.json for `pid` into `images_dir` (mode 0600, like runc),
    creating the directory (0700) if needed.

    Call it before the dump: after a dump that does not leave the tasks running, the
    process and its fds are gone.
    """
    targets = stdio_targets(pid)
    images_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = images_dir / DESCRIPTORS_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(targets, out, separators=(",", ":"))


def read_descriptors(images_dir: Path) -> list[str]:
    """The stdio targets recorded in `images_dir`; ValueError if malformed."""
    data = json.loads((images_dir / DESCRIPTORS_FILE).read_text())
    if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
        raise ValueError(f"{images_dir / DESCRIPTORS_FILE}: expected a JSON list of strings")
    return data
