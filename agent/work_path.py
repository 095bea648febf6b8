"""CRIU's dump.log and stats-dump, handed to the directory the client named for them.

runc's shim runs CRIU with the client's work path as its work directory, so the log
and the statistics land where the client looks: `ctr ... --work-path`, and kubelet's
checkpoint API on containerd 2.x, whose archive carries them at its top (read by
`checkpointctl inspect --stats`). The agent runs CRIU in its own work directory (it
keeps failed dumps' logs, and recovers from CRIU's log after a crash), then copies the
two files there. The path comes from the shim and, through it, from a client: it must
be an existing directory, not a symlink, owned by root; the files are written through
a descriptor of it, never following a symlink.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from kybernate.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

#: What CRIU writes into its work directory during a dump, as runc's shim leaves them.
CRIU_DUMP_FILES = ("dump.log", "stats-dump")
_COPY_CHUNK = 1 << 20


def client_work_path(text: str, container_id: str) -> Path | None:
    """The validated work path of a request (None when it names none)."""
    if not text:
        return None
    path = Path(text)
    if not path.is_absolute() or ".." in path.parts:
        raise InvalidArgument(f"checkpoint of {container_id}: work path {text!r} must be absolute,"
                              " without '..'")
    try:
        info = os.lstat(path)
    except OSError as err:
        raise FailedPrecondition(f"checkpoint of {container_id}: work path {path}: {err.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise FailedPrecondition(f"checkpoint of {container_id}: work path {path} is not a directory"
                                 " (a symlink is refused)")
    if info.st_uid != 0:
        raise FailedPrecondition(f"checkpoint of {container_id}: work path {path} is not owned by root")
    return path


def hand_over(work_dir: Path, target: Path) -> list[str]:
    """Copy CRIU's dump files from the agent's work directory into `target`; the names
    copied. Best effort: they are diagnostics, and the checkpoint stands without them."""
    copied: list[str] = []
    try:
        target_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as err:
        log.warning("cannot hand CRIU's logs to %s: %s", target, err.strerror)
        return copied
    try:
        for name in CRIU_DUMP_FILES:
            try:
                _copy_into(work_dir / name, target_fd, name)
            except FileNotFoundError:
                continue
            except OSError as err:
                log.warning("cannot copy %s into %s: %s", name, target, err.strerror)
                continue
            copied.append(name)
    finally:
        os.close(target_fd)
    return copied


def _copy_into(source: Path, directory_fd: int, name: str) -> None:
    with open(source, "rb") as reader:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600, dir_fd=directory_fd)
        with os.fdopen(fd, "wb") as writer:
            while chunk := reader.read(_COPY_CHUNK):
                writer.write(chunk)
