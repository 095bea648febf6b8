"""The remote tier: checkpoints in an S3-compatible bucket, through boto3.

Layout under the configured `<prefix>`:

    checkpoints/<id>/<file>            every file a checkpoint's metadata lists
    checkpoints/<id>/metadata.json     uploaded last: a remote checkpoint is complete iff it exists
    names/<namespace>/<name>/<node>    {"id", "created_at"}: the name index

Each node writes name-index entries only under its own node key, so no node can
overwrite another's; resolving a name in a namespace picks the newest entry across
nodes. (The layout before this one, `<id>/<file>` and `names/<name>`, is not read:
its names carry no namespace.)

Integrity comes from the server's own checksum: every object is uploaded with
`ChecksumAlgorithm=CRC32`, of the full-object type for multipart uploads, so the one
CRC the server stores covers the whole file. After an upload it must equal the CRC of
the local file (read in the same pass that checks the file's sha256 against
metadata.json); after a download the downloaded file's CRC must equal it. The sha256
of every file in metadata.json stays the end-to-end check (`commit.verify`).
CRC32 because the server keeps it as one whole-object checksum for multipart
uploads and Python's zlib computes it; CRC32C and CRC64NVME would need awscrt.

Everything read from the bucket (name-index entries, metadata.json's file list) is
validated with `kybernate.agent.naming` before it becomes a key or a path.

Every method blocks; call it from a thread. Transfers are multipart with parts of
`part_size_bytes`, `max_concurrency` at a time, streamed from and to disk, so memory
stays bounded whatever the checkpoint's size. Each request is retried by botocore's
retry mode; the promoter's backoff is only for an outage that outlasts those.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import threading
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from kybernate.agent import commit, naming
from kybernate.agent.config import S3Config
from kybernate.api import layout
from kybernate.errors import (
    Cancelled,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    KybernateError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
NAMES = "names"
CHECKSUM_ALGORITHM = "CRC32"
#: Refuse bucket content beyond these before reading it into memory.
METADATA_MAX_BYTES = 16 << 20
NAME_ENTRY_MAX_BYTES = 4096
FILES_MAX = 100_000
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_READ_CHUNK = 1 << 20
_UPLOAD_ARGS = {"ChecksumAlgorithm": CHECKSUM_ALGORITHM, "ChecksumType": "FULL_OBJECT"}
_DOWNLOAD_ARGS = {"ChecksumMode": "ENABLED"}


@dataclasses.dataclass(frozen=True)
class NameEntry:
    """One node's entry in the name index: `name` in `namespace` is `checkpoint_id`."""

    namespace: str
    name: str
    node: str
    checkpoint_id: str
    created_at: datetime


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    rel: str
    size: int
    sha256: str


def crc32_base64(data: bytes) -> str:
    """A CRC32 as S3 writes it: the big-endian 4 bytes, base64."""
    return base64.b64encode((zlib.crc32(data) & 0xFFFFFFFF).to_bytes(4, "big")).decode()


def _digests(path: Path) -> tuple[str, str]:
    """(sha256 hex, CRC32 as S3 writes it) of a file, in one pass."""
    sha = hashlib.sha256()
    crc = 0
    buffer = bytearray(_READ_CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            sha.update(view[:n])
            crc = zlib.crc32(view[:n], crc)
    return sha.hexdigest(), base64.b64encode((crc & 0xFFFFFFFF).to_bytes(4, "big")).decode()


def checked_files(document: Any, checkpoint_id: str, where: str) -> list[RemoteFile]:
    """The file list of a checkpoint's metadata, every entry validated: a relative path
    inside the checkpoint directory that is not also the directory of another entry,
    an integer size and a sha256. DataLoss (FailedPrecondition for another format)
    naming the first entry that is not."""
    if not isinstance(document, dict) or not isinstance(document.get("files"), dict):
        raise DataLoss(f"{where}: {layout.METADATA_FILE} has no file list")
    if document.get("format") != commit.METADATA_FORMAT:
        raise FailedPrecondition(f"{where}: metadata format {repr(document.get('format'))[:20]}"
                                 f" is not {commit.METADATA_FORMAT}")
    if document.get("id") != checkpoint_id:
        raise DataLoss(f"{where}: {layout.METADATA_FILE} is that of checkpoint"
                       f" {str(document.get('id'))[:80]!r}, not {checkpoint_id}")
    files: dict[Any, Any] = document["files"]
    if len(files) > FILES_MAX:
        raise DataLoss(f"{where}: {len(files)} files listed, more than {FILES_MAX}")
    checked: list[RemoteFile] = []
    for rel in sorted(files, key=str):
        naming.relative_file(rel, where)
        entry = files[rel]
        if rel == layout.METADATA_FILE:
            raise DataLoss(f"{where}: lists {layout.METADATA_FILE} as one of its own files")
        size = entry.get("size") if isinstance(entry, dict) else None
        sha256 = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise DataLoss(f"{where}: file {rel} has no valid size")
        if not isinstance(sha256, str) or not _SHA256.match(sha256):
            raise DataLoss(f"{where}: file {rel} has no valid sha256")
        checked.append(RemoteFile(rel, size, sha256))
    # "a" and "a/b" together: one of them would have to be both a file and a directory.
    directories = {str(parent) for f in checked for parent in PurePosixPath(f.rel).parents}
    for f in checked:
        if f.rel in directories:
            raise DataLoss(f"{where}: {f.rel} is listed as a file and as a directory of other files")
    return checked


class RemoteTier:
    """An S3 bucket through boto3. Every method blocks; call it from a thread."""

    def __init__(self, config: S3Config) -> None:
        import boto3  # only the agent pays for boto3, and only with a remote tier
        from boto3.s3.transfer import TransferConfig, create_transfer_manager
        from botocore.config import Config

        self.config = config
        self._client: Any = boto3.client(
            "s3",
            endpoint_url=config.endpoint_url,
            region_name=config.region,
            aws_access_key_id=config.access_key_id,
            aws_secret_access_key=config.secret_access_key,
            config=Config(
                retries={"mode": config.retry_mode, "total_max_attempts": config.request_max_attempts},
                connect_timeout=3, read_timeout=60, max_pool_connections=config.max_concurrency + 4,
                # The defaults, spelled out: this module depends on them.
                request_checksum_calculation="when_supported",
                response_checksum_validation="when_supported"),
        )
        self._transfers = create_transfer_manager(self._client, TransferConfig(
            multipart_threshold=config.part_size_bytes, multipart_chunksize=config.part_size_bytes,
            max_concurrency=config.max_concurrency, max_io_queue=32, preferred_transfer_client="classic"))
        self._lock = threading.Lock()
        self._in_flight: set[Any] = set()
        self._closed = False

    @property
    def url(self) -> str:
        return self.config.url

    @property
    def client(self) -> Any:
        """The boto3 client (tests hook its events)."""
        return self._client

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Cancel the transfers in flight (their callers get Cancelled), refuse new ones,
        and wait for the transfer threads to end."""
        with self._lock:
            for future in self._in_flight:
                future.cancel()
            self._closed = True
        self._transfers.shutdown(cancel=True)

    # -- keys -----------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return self.config.prefix + "/".join(parts)

    def checkpoint_key(self, checkpoint_id: str, rel: str) -> str:
        return self._key(CHECKPOINTS, checkpoint_id, rel)

    def name_key(self, namespace: str, name: str, node: str) -> str:
        return self._key(NAMES, namespace, name, node)

    # -- upload ---------------------------------------------------------------

    def upload(self, directory: Path, checkpoint_id: str, *, namespace: str, name: str, node: str,
               created_at: datetime, progress: Callable[[int], None] | None = None) -> None:
        """Upload a committed checkpoint: every file, then metadata.json, then this
        node's name-index entry. A file already in the bucket with the same size and
        checksum is not sent again, so a retry resumes where the last attempt stopped.

        DataLoss when the local copy fails its sha256 or the server's checksum differs
        from the local file's; InvalidArgument for a malformed namespace, name or node.
        `progress` (called from transfer threads) hears of the bytes sent, and of those
        already in the bucket.
        """
        checkpoint_id = naming.checkpoint_id(checkpoint_id)
        entry = NameEntry(namespace=naming.containerd_namespace(namespace), name=naming.checkpoint_name(name),
                          node=naming.node_name(node), checkpoint_id=checkpoint_id, created_at=created_at)
        if created_at.tzinfo is None:
            raise InvalidArgument(f"upload of checkpoint {checkpoint_id}: created_at has no time zone")
        where = f"local copy of checkpoint {checkpoint_id} ({directory})"
        files = checked_files(commit.read_metadata(directory), checkpoint_id, where)
        with self._translated(f"upload of checkpoint {checkpoint_id}"):
            for f in files:
                sha256, crc = _digests(directory / f.rel)
                if sha256 != f.sha256:
                    raise DataLoss(f"{where}: file {f.rel} failed its sha256 check; not uploading it")
                self._put_file(directory / f.rel, self.checkpoint_key(checkpoint_id, f.rel), f.size, crc,
                               progress)
            meta_path = directory / layout.METADATA_FILE
            _, meta_crc = _digests(meta_path)
            # Last: its presence is what makes the remote copy a checkpoint.
            self._put_file(meta_path, self.checkpoint_key(checkpoint_id, layout.METADATA_FILE),
                           meta_path.stat().st_size, meta_crc)
            body = json.dumps({"id": checkpoint_id, "created_at": created_at.isoformat()}).encode()
            self._client.put_object(Bucket=self.config.bucket, Body=body, ContentType="application/json",
                                    Key=self.name_key(entry.namespace, entry.name, entry.node),
                                    ChecksumAlgorithm=CHECKSUM_ALGORITHM)

    def _put_file(self, path: Path, key: str, size: int, crc: str,
                  progress: Callable[[int], None] | None = None) -> None:
        existing = self._head_or_none(key)
        if existing is not None and self._matches(existing, size, crc):
            if progress is not None:
                progress(size)
            return
        self._transfer(lambda: self._transfers.upload(str(path), self.config.bucket, key,
                                                      extra_args=dict(_UPLOAD_ARGS),
                                                      subscribers=_subscribers(progress)))
        head = self._head_or_none(key)
        if head is None or not self._matches(head, size, crc):
            got = "nothing" if head is None else f"{head['ContentLength']} bytes, CRC32 {self._server_crc(head)}"
            raise DataLoss(f"{self.url}: {key} does not match the local file after upload: the server"
                           f" holds {got}; the file has {size} bytes, CRC32 {crc}")

    def _matches(self, head: dict[str, Any], size: int, crc: str) -> bool:
        return bool(head["ContentLength"] == size and self._server_crc(head) == crc)

    # -- reads ----------------------------------------------------------------

    def is_complete(self, checkpoint_id: str) -> bool:
        key = self.checkpoint_key(naming.checkpoint_id(checkpoint_id), layout.METADATA_FILE)
        with self._translated(f"checkpoint {checkpoint_id}"):
            return self._head_or_none(key) is not None

    def name_entries(self, namespace: str, name: str) -> list[NameEntry]:
        """Every node's entry for `name` in `namespace`, each validated."""
        namespace, name = naming.containerd_namespace(namespace), naming.checkpoint_name(name)
        prefix = self._key(NAMES, namespace, name) + "/"
        with self._translated(f"checkpoint name {name!r} in namespace {namespace!r}"):
            keys = [obj["Key"] for page in self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.config.bucket, Prefix=prefix) for obj in page.get("Contents", [])]
            return [self._name_entry(namespace, name, key, key[len(prefix):]) for key in sorted(keys)]

    def resolve_name(self, namespace: str, name: str) -> NameEntry:
        """The newest entry for `name` in `namespace`, across nodes; NotFound if none."""
        entries = self.name_entries(namespace, name)
        if not entries:
            raise NotFound(f"{self.url}: no checkpoint named {name!r} in namespace {namespace!r}")
        return max(entries, key=lambda e: (e.created_at, e.checkpoint_id))

    def _name_entry(self, namespace: str, name: str, key: str, node: str) -> NameEntry:
        where = f"{self.url}: name index entry {key}"
        try:
            node = naming.node_name(node)
        except InvalidArgument as exc:
            raise DataLoss(f"{where}: {exc}") from None
        response = self._client.get_object(Bucket=self.config.bucket, Key=key, ChecksumMode="ENABLED")
        with response["Body"] as stream:
            if response["ContentLength"] > NAME_ENTRY_MAX_BYTES:
                raise DataLoss(f"{where}: {response['ContentLength']} bytes, more than {NAME_ENTRY_MAX_BYTES}")
            body = stream.read()
        try:
            document = json.loads(body)
            checkpoint_id = naming.checkpoint_id(document["id"])
            created_at = datetime.fromisoformat(document["created_at"])
        except (ValueError, TypeError, KeyError, InvalidArgument) as exc:
            raise DataLoss(f"{where}: not a valid entry ({type(exc).__name__}: {str(exc)[:120]})") from None
        if created_at.tzinfo is None:
            raise DataLoss(f"{where}: created_at has no time zone")
        return NameEntry(namespace=namespace, name=name, node=node, checkpoint_id=checkpoint_id,
                         created_at=created_at)

    # -- download -------------------------------------------------------------

    def download(self, checkpoint_id: str, target: Path, *, max_bytes: int | None = None,
                 progress: Callable[[int], None] | None = None,
                 on_total: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Download a complete remote checkpoint into `target`, which must not exist;
        returns its metadata. metadata.json is read and validated first and written
        last; every file's CRC is checked against the server's and its sha256 against
        metadata.json's, in one read. Nothing here is fsynced: that is the caller's
        (see `fetch`).

        NotFound when the bucket has no complete checkpoint `checkpoint_id`; DataLoss
        for content that fails a check; ResourceExhausted when the files add up to
        more than `max_bytes`.
        """
        checkpoint_id = naming.checkpoint_id(checkpoint_id)
        meta_key = self.checkpoint_key(checkpoint_id, layout.METADATA_FILE)
        where = f"{self.url}: checkpoint {checkpoint_id}"
        with self._translated(f"download of checkpoint {checkpoint_id}"):
            head = self._head_or_none(meta_key)
            if head is None:
                raise NotFound(f"{where}: not in the bucket, or its upload never completed"
                               f" (no {layout.METADATA_FILE})")
            if head["ContentLength"] > METADATA_MAX_BYTES:
                raise DataLoss(f"{where}: {layout.METADATA_FILE} has {head['ContentLength']} bytes,"
                               f" more than {METADATA_MAX_BYTES}")
            expected_crc = self._expected_crc(head, meta_key)
            response = self._client.get_object(Bucket=self.config.bucket, Key=meta_key, ChecksumMode="ENABLED",
                                               IfMatch=head["ETag"])
            with response["Body"] as stream:
                meta_bytes = stream.read(METADATA_MAX_BYTES + 1)
            if crc32_base64(meta_bytes) != expected_crc:
                raise DataLoss(f"{where}: {layout.METADATA_FILE} does not match the server's checksum")
            try:
                # checked_files below refuses anything but an object with a file list.
                document: dict[str, Any] = json.loads(meta_bytes)
            except ValueError as exc:
                raise DataLoss(f"{where}: {layout.METADATA_FILE} is not JSON: {exc}") from None
            files = checked_files(document, checkpoint_id, where)
            total = sum(f.size for f in files)
            if max_bytes is not None and total > max_bytes:
                raise ResourceExhausted(f"{where}: needs {total} bytes; {max_bytes} are free")
            if on_total is not None:
                on_total(total)
            target.mkdir(mode=0o700)
            for f in files:
                self._get_file(self.checkpoint_key(checkpoint_id, f.rel), target / f.rel, f, where, progress)
            # Last, as on upload: a local copy without it is not a checkpoint.
            (target / layout.METADATA_FILE).write_bytes(meta_bytes)
            return document

    def _get_file(self, key: str, path: Path, expected: RemoteFile, where: str,
                  progress: Callable[[int], None] | None = None) -> None:
        from botocore.exceptions import FlexibleChecksumError

        size = expected.size

        head = self._head_or_none(key)
        if head is None:
            raise DataLoss(f"{where}: file {key} is missing from the bucket")
        if head["ContentLength"] != size:
            raise DataLoss(f"{where}: {key} has {head['ContentLength']} bytes; metadata says {size}")
        expected_crc = self._expected_crc(head, key)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # botocore checks the checksum of a whole-object GET itself, but not of the
        # ranged GETs of a multipart download: the CRC of the file checks both.
        try:
            self._transfer(lambda: self._transfers.download(self.config.bucket, key, str(path),
                                                            extra_args=dict(_DOWNLOAD_ARGS),
                                                            subscribers=_subscribers(progress)))
        except FlexibleChecksumError as exc:
            raise DataLoss(f"{where}: downloaded {key} does not match the server's checksum ({exc})") from None
        # One read of the download checks both the server's CRC and metadata.json's
        # sha256: the fetch then seals the copy instead of hashing it again.
        sha256, crc = _digests(path)
        if crc != expected_crc or path.stat().st_size != size:
            raise DataLoss(f"{where}: downloaded {key} does not match the server's checksum"
                           f" (CRC32 {crc}, expected {expected_crc})")
        if sha256 != expected.sha256:
            raise DataLoss(f"{where}: downloaded file {expected.rel} failed its sha256 check")

    # -- removal --------------------------------------------------------------

    def delete(self, checkpoint_id: str, *, namespace: str, name: str, node: str) -> int:
        """Remove a checkpoint from the bucket; the bytes its files held (0: none there).

        metadata.json goes first, so that the remote copy stops being a checkpoint at
        once (a fetch finds it incomplete, never half deleted); then its files, then
        this node's name-index entry if it still names this checkpoint. Entries of
        other nodes are theirs to change.
        """
        checkpoint_id = naming.checkpoint_id(checkpoint_id)
        namespace, name, node = (naming.containerd_namespace(namespace), naming.checkpoint_name(name),
                                 naming.node_name(node))
        with self._translated(f"removal of checkpoint {checkpoint_id}"):
            bucket = self.config.bucket
            self._client.delete_object(Bucket=bucket, Key=self.checkpoint_key(checkpoint_id, layout.METADATA_FILE))
            prefix = self._key(CHECKPOINTS, checkpoint_id) + "/"
            freed = 0
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                objects = page.get("Contents", [])
                freed += sum(int(obj.get("Size", 0)) for obj in objects)
                if objects:
                    self._client.delete_objects(Bucket=bucket, Delete={
                        "Objects": [{"Key": obj["Key"]} for obj in objects], "Quiet": True})
            name_key = self.name_key(namespace, name, node)
            if self._head_or_none(name_key) is not None:
                try:
                    entry = self._name_entry(namespace, name, name_key, node)
                except DataLoss:
                    entry = None  # unreadable: this node's own entry, so it may go
                if entry is None or entry.checkpoint_id == checkpoint_id:
                    self._client.delete_object(Bucket=bucket, Key=name_key)
            return freed

    def check_reachable(self) -> None:
        """Unavailable (or PermissionDenied, NotFound) unless the bucket answers."""
        with self._translated(f"bucket {self.config.bucket}"):
            self._client.head_bucket(Bucket=self.config.bucket)

    # -- helpers --------------------------------------------------------------

    def _head_or_none(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return dict(self._client.head_object(Bucket=self.config.bucket, Key=key, ChecksumMode="ENABLED"))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code", "") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    @staticmethod
    def _server_crc(head: dict[str, Any]) -> str | None:
        """The server's whole-object CRC32; None for none, or for a per-part (composite) one."""
        value = head.get("ChecksumCRC32")
        if not isinstance(value, str) or "-" in value or head.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
            return None
        return value

    def _expected_crc(self, head: dict[str, Any], key: str) -> str:
        crc = self._server_crc(head)
        if crc is None:
            raise DataLoss(f"{self.url}: {key} has no whole-object CRC32 from the server"
                           f" ({head.get('ChecksumType') or 'no checksum'}); refusing to trust it")
        return crc

    def _transfer(self, submit: Callable[[], Any]) -> None:
        """Submit a transfer and wait for it; Cancelled if `close()` came first or cancelled it."""
        with self._lock:
            if self._closed:
                raise Cancelled(f"{self.url}: the remote tier is closed")
            future = submit()
            self._in_flight.add(future)
        try:
            future.result()
        except concurrent.futures.CancelledError:
            raise Cancelled(f"{self.url}: transfer cancelled: the remote tier is closing") from None
        finally:
            with self._lock:
                self._in_flight.discard(future)

    @contextlib.contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        """Errors of boto3 and botocore as Kybernate's, naming `what` failed."""
        try:
            yield
        except KybernateError:
            raise
        except Exception as exc:
            raise self._wrap(what, exc) from exc

    def _wrap(self, what: str, exc: Exception) -> Exception:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError, FlexibleChecksumError

        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                return NotFound(f"{self.url}: {what}: not found")
            if code in ("403", "AccessDenied"):
                return PermissionDenied(f"{self.url}: {what}: access denied")
            return Unavailable(f"{self.url}: {what}: {code or exc}")
        if isinstance(exc, FlexibleChecksumError):
            return DataLoss(f"{self.url}: {what}: {exc}")
        if isinstance(exc, BotoCoreError | Boto3Error):
            return Unavailable(f"{self.url}: {what}: {exc}")
        return exc


class _Progress:
    """An s3transfer subscriber (it calls `on_progress` with each chunk's byte count)."""

    def __init__(self, progress: Callable[[int], None]) -> None:
        self._progress = progress

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        self._progress(bytes_transferred)


def _subscribers(progress: Callable[[int], None] | None) -> list[_Progress]:
    return [] if progress is None else [_Progress(progress)]
