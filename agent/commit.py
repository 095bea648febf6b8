"""The commit protocol: a checkpoint either exists whole or not at all.

A checkpoint is built in `<local_tier>/.staging-<id>` (same filesystem as its final
place). `metadata.json` is written last and lists every file with its size and
sha256; files and directory are fsynced, the directory is renamed to
`<local_tier>/<id>`, and the parent is fsynced. No `metadata.json`, no checkpoint:
`verify()` refuses anything missing, extra or altered, naming the file.

Everything here is blocking file I/O; callers run it in a thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kybernate.agent import naming
from kybernate.api.layout import METADATA_FILE
from kybernate.errors import DataLoss, FailedPrecondition, Internal

METADATA_FORMAT = 1
STAGING_PREFIX = ".staging-"
#: Written into a staging directory once its data is complete (the dump succeeded):
#: the metadata without the file list, so that a checkpoint whose agent stopped before
#: the commit can still be committed by the next one. Never part of the checkpoint.
DRAFT_FILE = ".kybernate-draft.json"
DRAFT_DUMPING = "dumping"
DRAFT_COMPLETE = "complete"
#: CRIU's last log line of a dump that succeeded.
CRIU_DUMP_DONE = "Dumping finished successfully"
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Hashing (CPU, page cache) and fsync (disk) of a GB-sized dump overlap in threads:
# hashlib releases the GIL, and the container stays paused until the commit ends.
_IO_THREADS = 4
_VERIFY_CHUNK = 4 << 20


def staging_path(local_tier: Path, checkpoint_id: str) -> Path:
    return local_tier / f"{STAGING_PREFIX}{checkpoint_id}"


def committed_path(local_tier: Path, checkpoint_id: str) -> Path:
    return local_tier / checkpoint_id


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _payload_files(directory: Path) -> list[Path]:
    """Every regular file under `directory` except metadata.json, as relative paths."""
    files: list[Path] = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise DataLoss(f"checkpoint {directory}: {rel} is not a regular file")
        if path.is_file() and rel.as_posix() != METADATA_FILE and not rel.as_posix().startswith(DRAFT_FILE):
            files.append(rel)
    return files


def _largest_first(directory: Path, files: list[Path]) -> list[Path]:
    return sorted(files, key=lambda rel: (directory / rel).stat().st_size, reverse=True)


def _hash_all(pool: ThreadPoolExecutor, directory: Path, files: list[Path]) -> dict[Path, Future[str]]:
    return {rel: pool.submit(sha256_file, directory / rel) for rel in _largest_first(directory, files)}


def payload_names(directory: Path) -> list[str]:
    """Every payload file of `directory` (metadata.json and drafts aside), relative."""
    return [rel.as_posix() for rel in _payload_files(directory)]


def hash_files(directory: Path, names: Collection[str]) -> dict[str, str]:
    """{relative path: sha256} of `names` under `directory`, hashed in parallel."""
    with ThreadPoolExecutor(_IO_THREADS, thread_name_prefix="kyb-hash") as pool:
        digests = _hash_all(pool, directory, [Path(rel) for rel in names])
        return {rel.as_posix(): future.result() for rel, future in digests.items()}


def manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} for every payload file."""
    files = _payload_files(directory)
    with ThreadPoolExecutor(_IO_THREADS, thread_name_prefix="kyb-hash") as pool:
        digests = _hash_all(pool, directory, files)
        return {rel.as_posix(): {"size": (directory / rel).stat().st_size, "sha256": digests[rel].result()}
                for rel in files}


_LIBC = ctypes.CDLL(None, use_errno=True)
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(directory: Path) -> None:
    """Ask the kernel to start writing every payload file to disk, without waiting
    (sync_file_range(SYNC_FILE_RANGE_WRITE)): the commit's fsync, later, then finds
    little left to wait for. Best effort."""
    for rel in _payload_files(directory):
        try:
            fd = os.open(directory / rel, os.O_RDONLY)
        except OSError:
            continue
        try:
            _LIBC.sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0), SYNC_FILE_RANGE_WRITE)
        finally:
            os.close(fd)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: Path) -> None:
    _fsync_path(path)


def write_json_durably(path: Path, document: Mapping[str, Any]) -> None:
    with path.open("w", encoding="utf-8") as f:
        json.dump(document, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def document_for(metadata: Mapping[str, Any], files: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The metadata.json of a checkpoint: `metadata` plus the format and the file list."""
    return {**metadata, "format": METADATA_FORMAT, "files": {rel: dict(entry) for rel, entry in files.items()}}


def file_entries(directory: Path, digests: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} from digests already computed."""
    return {rel: {"size": (directory / rel).stat().st_size, "sha256": digest}
            for rel, digest in sorted(digests.items())}


def _check_precomputed(staging: Path, payload: list[Path], files: Mapping[str, Mapping[str, Any]]) -> None:
    """Digests computed while the data was written must cover exactly what is on disk."""
    present = {rel.as_posix() for rel in payload}
    if present != set(files):
        raise Internal(f"{staging}: hashed {sorted(files)}, but the directory holds {sorted(present)}")
    for rel, entry in files.items():
        if (staging / rel).stat().st_size != entry["size"]:
            raise Internal(f"{staging}: {rel} changed size after it was hashed")


def commit(staging: Path, final: Path, metadata: Mapping[str, Any], *,
           files: Mapping[str, Mapping[str, Any]] | None = None,
           before_metadata: Callable[[], None] | None = None) -> dict[str, Any]:
    """Seal `staging` and rename it to `final`; returns the metadata written.

    `metadata` is everything but the file list, which is computed here from what
    is actually on disk, unless `files` brings it (hashed while CRIU wrote, see
    `kybernate.agent.hash_behind`): then only sizes are checked. `before_metadata`
    runs once the files are hashed and synced (fault injection).
    """
    if (staging / METADATA_FILE).exists():
        raise Internal(f"{staging} already has {METADATA_FILE}: refusing to commit twice")
    if final.exists():
        raise Internal(f"{final} already exists")
    payload = _payload_files(staging)
    with ThreadPoolExecutor(_IO_THREADS, thread_name_prefix="kyb-commit") as pool:
        # Writeback starts for every file while the hashes are computed.
        synced = [pool.submit(_fsync_path, staging / rel) for rel in _largest_first(staging, payload)]
        if files is None:
            digests = _hash_all(pool, staging, payload)
            files = file_entries(staging, {rel.as_posix(): digests[rel].result() for rel in payload})
        else:
            _check_precomputed(staging, payload, files)
        for done in synced:
            done.result()
    if before_metadata is not None:
        before_metadata()
    document = document_for(metadata, files)
    for sub in sorted({p.parent for p in (staging / r for r in files)} - {staging}):
        _fsync_path(sub)
    # Last: its presence is what makes the directory a checkpoint.
    write_json_durably(staging / METADATA_FILE, document)
    for draft in staging.glob(DRAFT_FILE + "*"):
        draft.unlink()
    _fsync_path(staging)
    os.rename(staging, final)
    _fsync_path(final.parent)
    return document


def boot_id() -> str:
    """This boot's id: page-cache contents that were never fsynced survive an agent
    crash, but not a reboot."""
    try:
        with open(BOOT_ID_FILE) as f:
            return f.read().strip()
    except OSError:
        return ""


def write_draft(staging: Path, metadata: Mapping[str, Any], state: str, *, work_dir: Path) -> None:
    """Record (durably) that the data in `staging` is being dumped or is complete."""
    draft = {"state": state, "boot_id": boot_id(), "work_dir": str(work_dir), "metadata": dict(metadata)}
    path = staging / DRAFT_FILE
    temporary = path.with_name(path.name + ".tmp")
    write_json_durably(temporary, draft)
    os.rename(temporary, path)
    _fsync_path(staging)


def recoverable_metadata(staging: Path) -> dict[str, Any] | None:
    """The metadata of a staging directory whose data is complete and still trustworthy
    (same boot, dump finished), else None."""
    try:
        draft = json.loads((staging / DRAFT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(draft, dict) or not isinstance(draft.get("metadata"), dict):
        return None
    if not draft.get("boot_id") or draft["boot_id"] != boot_id():
        return None  # written before a reboot: the images may never have reached the disk
    if draft.get("state") == DRAFT_DUMPING:
        # The agent stopped between CRIU's answer and the draft's update: CRIU's own
        # log says whether the dump finished.
        log = Path(str(draft.get("work_dir", ""))) / "dump.log"
        try:
            finished = CRIU_DUMP_DONE in log.read_text(errors="replace")[-4096:]
        except OSError:
            finished = False
        if not finished:
            return None
    elif draft.get("state") != DRAFT_COMPLETE:
        return None
    return dict(draft["metadata"])


def recover(staging: Path, final: Path) -> dict[str, Any] | None:
    """Commit a staging directory a stopped agent left with complete data; None when
    its data is incomplete (the caller removes it)."""
    metadata = recoverable_metadata(staging)
    if metadata is None:
        return None
    with contextlib.suppress(FileNotFoundError):
        (staging / METADATA_FILE).unlink()  # half written when the agent stopped
    return commit(staging, final, metadata)


def read_metadata(directory: Path) -> dict[str, Any]:
    path = directory / METADATA_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataLoss(f"checkpoint {directory}: {METADATA_FILE} is missing (the checkpoint never committed)") from None
    except (OSError, ValueError) as exc:
        raise DataLoss(f"checkpoint {directory}: {METADATA_FILE} is unreadable: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("files"), dict):
        raise DataLoss(f"checkpoint {directory}: {METADATA_FILE} has no file list")
    # It may come from another node, a bucket or an archive: every entry is checked
    # before it becomes a path.
    where = f"checkpoint {directory}: {METADATA_FILE}"
    for rel, entry in document["files"].items():
        naming.relative_file(rel, where)
        if rel in (METADATA_FILE, DRAFT_FILE):
            raise DataLoss(f"{where} lists {rel} as a payload file")
        if (not isinstance(entry, dict) or isinstance(entry.get("size"), bool)
                or not isinstance(entry.get("size"), int) or entry["size"] < 0
                or not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"])):
            raise DataLoss(f"{where}: entry {rel} needs a size and a sha256")
    if document.get("format") != METADATA_FORMAT:
        raise FailedPrecondition(
            f"checkpoint {directory}: metadata format {document.get('format')!r} is not {METADATA_FORMAT}")
    return document


def criu_major(version: str) -> int | None:
    head = version.strip().split(".", 1)[0]
    return int(head) if head.isdigit() else None


def sha256_file_reporting(path: Path, progress: Callable[[int], None]) -> str:
    """sha256 of a file, telling `progress` of each chunk's bytes as it goes."""
    digest = hashlib.sha256()
    buffer = bytearray(_VERIFY_CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            progress(n)
    return digest.hexdigest()


def verify(directory: Path, *, criu_version: str | None = None,
           progress: Callable[[int], None] | None = None,
           trusted: Collection[str] = frozenset(), deferred: Collection[str] = frozenset()) -> dict[str, Any]:
    """Check every file against metadata.json; returns the metadata. `progress` (called
    from worker threads) hears of every chunk hashed.

    Raises DataLoss naming the first file that is missing, extra, resized or
    altered, and FailedPrecondition when the checkpoint was made by a CRIU of
    another major version than `criu_version`. Files in `trusted` (their seal
    matched, see `kybernate.agent.seal`) and in `deferred` (hashed later, while CRIU
    restores) are checked for presence and size only.
    """
    if not directory.is_dir():
        raise DataLoss(f"checkpoint directory {directory} does not exist")
    document = read_metadata(directory)
    expected: dict[str, Any] = document["files"]
    present = {rel.as_posix() for rel in _payload_files(directory)}
    if extra := sorted(present - expected.keys()):
        raise DataLoss(f"checkpoint {directory}: unexpected file {extra[0]} (not in {METADATA_FILE})")
    for rel, entry in sorted(expected.items()):
        path = directory / rel
        if rel not in present:
            raise DataLoss(f"checkpoint {directory}: file {rel} is missing")
        if path.stat().st_size != entry.get("size"):
            raise DataLoss(f"checkpoint {directory}: file {rel} has size {path.stat().st_size},"
                           f" expected {entry.get('size')}")
    hashed = sorted(rel for rel in expected if rel not in trusted and rel not in deferred)
    with ThreadPoolExecutor(_IO_THREADS, thread_name_prefix="kyb-verify") as pool:
        if progress is None:
            digests = _hash_all(pool, directory, [Path(rel) for rel in hashed])
        else:
            reporting = progress
            digests = {Path(rel): pool.submit(sha256_file_reporting, directory / rel, reporting)
                       for rel in hashed}
        for rel in hashed:
            if digests[Path(rel)].result() != expected[rel].get("sha256"):
                raise DataLoss(f"checkpoint {directory}: file {rel} failed its sha256 check")
    if criu_version is not None:
        recorded = str(document.get("host", {}).get("criu_version", ""))
        if criu_major(recorded) != criu_major(criu_version):
            raise FailedPrecondition(
                f"checkpoint {directory} was made by CRIU {recorded or 'unknown'}; this node has CRIU"
                f" {criu_version} (major versions differ)")
    return document


def export(directory: Path, destination: Path, *, document: Mapping[str, Any] | None = None) -> None:
    """Make the checkpoint's files available at containerd's `path` so it packs them.

    Hard links when on the same filesystem (no copy, and the checkpoint's files are
    never written again), copies otherwise. With `document`, metadata.json is written
    from it (the checkpoint is exported before its own commit, which writes the same
    document durably once the container runs again).
    """
    destination.mkdir(parents=True, exist_ok=True)
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if not path.is_file() or rel.as_posix().startswith(DRAFT_FILE):
            continue
        if document is not None and rel.as_posix() == METADATA_FILE:
            continue
        target = destination / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target.unlink()
        try:
            os.link(path, target)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            shutil.copy2(path, target)
    if document is not None:
        with (destination / METADATA_FILE).open("w", encoding="utf-8") as f:
            json.dump(document, f, indent=2, sort_keys=True)
            f.write("\n")
