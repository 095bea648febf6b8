"""Checkpoints as OCI checkpoint images, the format Podman, CRI-O and checkpointctl use.

An image is one layer, a tar of the checkpoint archive as those tools lay it out:

    checkpoint/        CRIU's images (here: every file of the committed checkpoint,
                       Kybernate's metadata.json and runc's descriptors.json included)
    config.dump        the container: id, name, image, runtime, times (Podman's fields)
    spec.dump          an OCI runtime spec whose annotations name the container
    rootfs-diff.tar    the writable layer's changes, when the checkpoint saved them
    stats-dump         CRIU's dump statistics (also in checkpoint/)

The manifest carries the `org.criu.checkpoint.*` annotations (engine, container name,
image, runtime, CRIU version, host) and Kybernate's own (`io.kybernate.checkpoint.*`).
The layer is an uncompressed tar (`application/vnd.oci.image.layer.v1.tar`): CRIU's
pages hardly compress, and a multi-GB layer is streamed as it is hashed; gzip layers
are read too.

An image pulled from a registry is hostile input: the manifest, every tar entry (only
the entries above, only regular files and directories, names validated, sizes within
the layer) and finally every file against metadata.json (`commit.verify`) are checked
before the checkpoint exists locally. It is recorded under a new id in the importing
namespace; metadata.json says where it came from (`imported_from`).

A registry is a storage tier that peers promise and do not ship: a place to publish a
checkpoint for other clusters and tools, pulled on demand, never written behind the
operator's back (S3 is the tier the agent promotes to by itself).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shutil
import tarfile
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from kybernate.agent import commit, naming
from kybernate.agent.oci_registry import OCI_MANIFEST, Reference, RegistryClient
from kybernate.api import layout
from kybernate.errors import DataLoss, InvalidArgument, ResourceExhausted

LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
CHECKPOINT_DIR = "checkpoint"
CONFIG_DUMP = "config.dump"
SPEC_DUMP = "spec.dump"
ROOTFS_DIFF = "rootfs-diff.tar"
STATS_DUMP = "stats-dump"
RUNTIME_NAME = "io.containerd.kybernate.v1"
#: The top-level entries a checkpoint image's layer may hold.
TOP_LEVEL_FILES = frozenset({CONFIG_DUMP, SPEC_DUMP, ROOTFS_DIFF, STATS_DUMP})
ENTRIES_MAX = 100_000
_BLOCK = 512
_CHUNK = 1 << 20

ANNOTATION_ID = "io.kybernate.checkpoint.id"
ANNOTATION_NAME = "io.kybernate.checkpoint.name"
ANNOTATION_NAMESPACE = "io.kybernate.checkpoint.namespace"


@dataclasses.dataclass(frozen=True)
class LayerEntry:
    """One file of the layer: its name in the archive and where its bytes come from
    (a file on disk, or bytes made here)."""

    name: str
    size: int
    path: Path | None = None
    data: bytes = b""


def _header(name: str, size: int, *, directory: bool, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o700 if directory else 0o600
    info.mtime = mtime
    info.uname = info.gname = "root"
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _padding(size: int) -> int:
    return -size % _BLOCK


def layer_size(entries: list[LayerEntry], mtime: int) -> int:
    total = len(_header(CHECKPOINT_DIR + "/", 0, directory=True, mtime=mtime))
    for entry in entries:
        total += len(_header(entry.name, entry.size, directory=False, mtime=mtime)) + entry.size + _padding(entry.size)
    return total + 2 * _BLOCK


def layer_chunks(entries: list[LayerEntry], mtime: int) -> Iterator[bytes]:
    """The layer's tar, as chunks, built as it is read: nothing is staged on disk."""
    yield _header(CHECKPOINT_DIR + "/", 0, directory=True, mtime=mtime)
    for entry in entries:
        yield _header(entry.name, entry.size, directory=False, mtime=mtime)
        if entry.path is None:
            yield entry.data
        else:
            sent = 0
            with entry.path.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    sent += len(chunk)
                    yield chunk
            if sent != entry.size:
                raise DataLoss(f"{entry.path} changed size while it was exported")
        if pad := _padding(entry.size):
            yield b"\0" * pad
    yield b"\0" * (2 * _BLOCK)


def _json_bytes(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"


def archive_entries(directory: Path, metadata: Mapping[str, Any]) -> list[LayerEntry]:
    """The layer's files for a committed (verified) checkpoint directory."""
    container = metadata.get("container") or {}
    created = str(metadata.get("created_at", ""))
    config_dump = {
        "id": container.get("id", ""), "name": container.get("id", ""),
        "rootfsImage": container.get("image", ""), "rootfsImageName": container.get("image", ""),
        "runtime": RUNTIME_NAME, "createdTime": created, "checkpointedTime": created,
        "restoredTime": "0001-01-01T00:00:00Z", "restored": False,
    }
    annotations = {"io.kubernetes.cri.container-name": str(container.get("id", "")),
                   ANNOTATION_ID: str(metadata.get("id", ""))}
    if container.get("pod_namespace"):
        annotations["io.kubernetes.cri.sandbox-namespace"] = str(container["pod_namespace"])
    spec_dump = {"ociVersion": "1.0.2", "annotations": annotations}
    files: dict[str, Any] = metadata["files"]
    entries = [LayerEntry(f"{CHECKPOINT_DIR}/{rel}", int(files[rel]["size"]), directory / rel)
               for rel in sorted(files) if rel != ROOTFS_DIFF]
    meta_path = directory / layout.METADATA_FILE
    entries.append(LayerEntry(f"{CHECKPOINT_DIR}/{layout.METADATA_FILE}", meta_path.stat().st_size, meta_path))
    entries.append(LayerEntry(CONFIG_DUMP, len(data := _json_bytes(config_dump)), data=data))
    entries.append(LayerEntry(SPEC_DUMP, len(data := _json_bytes(spec_dump)), data=data))
    if ROOTFS_DIFF in files:
        entries.append(LayerEntry(ROOTFS_DIFF, int(files[ROOTFS_DIFF]["size"]), directory / ROOTFS_DIFF))
    if STATS_DUMP in files:
        entries.append(LayerEntry(STATS_DUMP, int(files[STATS_DUMP]["size"]), directory / STATS_DUMP))
    return entries


def manifest_annotations(metadata: Mapping[str, Any], agent_version: str) -> dict[str, str]:
    container = metadata.get("container") or {}
    host = metadata.get("host") or {}
    annotations = {
        "org.criu.checkpoint.engine.name": "kybernate",
        "org.criu.checkpoint.engine.version": agent_version,
        "org.criu.checkpoint.container.name": str(container.get("id", "")),
        "org.criu.checkpoint.rootfsImageName": str(container.get("image", "")),
        "org.criu.checkpoint.rootfsImageUserRequested": str(container.get("image", "")),
        "org.criu.checkpoint.runtime.name": RUNTIME_NAME,
        "org.criu.checkpoint.runtime.version": str(host.get("runc_version", "")),
        "org.criu.checkpoint.criu.version": str(host.get("criu_version", "")),
        "org.criu.checkpoint.host.kernel": str(host.get("kernel", "")),
        "org.criu.checkpoint.host.arch": platform.machine(),
        "org.criu.checkpoint.cgroup.version": "2" if os.path.exists("/sys/fs/cgroup/cgroup.controllers") else "1",
        ANNOTATION_ID: str(metadata.get("id", "")),
        ANNOTATION_NAME: str(metadata.get("name", "")),
        ANNOTATION_NAMESPACE: str(container.get("namespace", "")),
        "org.opencontainers.image.created": str(metadata.get("created_at", "")),
    }
    if container.get("pod_namespace"):
        annotations["org.criu.checkpoint.pod.namespace"] = str(container["pod_namespace"])
    return {key: value for key, value in annotations.items() if value}


def push(client: RegistryClient, reference: Reference, directory: Path, metadata: Mapping[str, Any], *,
         agent_version: str, progress: Callable[[int], None] | None = None,
         on_total: Callable[[int], None] | None = None) -> str:
    """Push a verified checkpoint as a checkpoint image; the manifest's digest. Blocking."""
    if reference.digest:
        raise InvalidArgument(f"export to {reference}: push to a tag, not a digest")
    try:
        mtime = int(datetime.fromisoformat(str(metadata.get("created_at"))).timestamp())
    except ValueError:
        mtime = 0
    entries = archive_entries(directory, metadata)
    size = layer_size(entries, mtime)
    if on_total is not None:
        on_total(size)
    layer_digest = client.push_stream(reference.repository, layer_chunks(entries, mtime), size, progress)
    config = {"architecture": _oci_arch(), "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
              "config": {"Labels": {ANNOTATION_ID: str(metadata.get("id", ""))}}}
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_digest = client.push_blob(reference.repository, config_bytes)
    manifest = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": IMAGE_CONFIG, "digest": config_digest, "size": len(config_bytes)},
        "layers": [{"mediaType": LAYER_TAR, "digest": layer_digest, "size": size}],
        "annotations": manifest_annotations(metadata, agent_version),
    }
    return client.put_manifest(reference, manifest)


def _oci_arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


# -- pull -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layer:
    digest: str
    size: int
    media_type: str


def checkpoint_layer(manifest: Mapping[str, Any], reference: Reference) -> Layer:
    """The one layer of a checkpoint image, validated."""
    layers = manifest.get("layers")
    if not isinstance(layers, list) or len(layers) != 1 or not isinstance(layers[0], dict):
        raise InvalidArgument(f"{reference} is not a checkpoint image: it has"
                              f" {len(layers) if isinstance(layers, list) else 'no'} layers, not one")
    layer = layers[0]
    media_type, digest, size = layer.get("mediaType"), layer.get("digest"), layer.get("size")
    if media_type not in (LAYER_TAR, LAYER_TAR_GZIP, DOCKER_LAYER_GZIP):
        raise InvalidArgument(f"{reference}: layer type {str(media_type)[:80]!r} is not a tar layer")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0 or not isinstance(digest, str):
        raise DataLoss(f"{reference}: its layer has no valid size or digest")
    return Layer(naming.digest(digest), size, media_type)


def pull_into(client: RegistryClient, reference: Reference, layer: Layer, target: Path, *,
              max_bytes: int, progress: Callable[[int], None] | None = None) -> None:
    """Download the layer and unpack its checkpoint into `target` (made here): the
    files of `checkpoint/` and rootfs-diff.tar; every entry validated. Blocking.

    The layer is downloaded to a file beside `target` first: its digest is checked
    before a single entry is read, so nothing of a blob the registry altered is ever
    unpacked."""
    if layer.size > max_bytes:
        raise ResourceExhausted(f"{reference}: its layer has {layer.size} bytes; {max_bytes} are free")
    blob = target.with_name(target.name + ".layer")
    try:
        with blob.open("wb") as f:
            def write(chunk: bytes) -> None:
                f.write(chunk)
            client.pull_blob(reference.repository, layer.digest, layer.size, write, progress)
        target.mkdir(mode=0o700)
        with tarfile.open(blob, mode="r:*") as archive:
            _unpack(archive, target, reference, limit=max(layer.size, 1) * 4)
    finally:
        with contextlib.suppress(FileNotFoundError):
            blob.unlink()


def _unpack(archive: tarfile.TarFile, target: Path, reference: Reference, *, limit: int) -> None:
    """Write the checkpoint's files from a checkpoint image's tar into `target`,
    refusing any entry that is not one: links, devices, unexpected names, paths out of
    the directory, a file twice, more data than `limit` (a gzip bomb)."""
    where = f"checkpoint image {reference}"
    seen: set[str] = set()
    written = 0
    count = 0
    for member in archive:
        count += 1
        if count > ENTRIES_MAX:
            raise DataLoss(f"{where}: more than {ENTRIES_MAX} entries")
        name = member.name.removeprefix("./").rstrip("/") if member.isdir() else member.name.removeprefix("./")
        if member.isdir():
            if name == CHECKPOINT_DIR or (name.startswith(CHECKPOINT_DIR + "/") and _relative(name, where)):
                continue
            raise DataLoss(f"{where}: unexpected directory {name[:120]!r} in the layer")
        if not member.isfile():
            raise DataLoss(f"{where}: {name[:120]!r} is not a regular file (links and devices are refused)")
        if name in seen:
            raise DataLoss(f"{where}: {name[:120]!r} appears twice in the layer")
        seen.add(name)
        written += member.size
        if written > limit:
            raise DataLoss(f"{where}: the layer unpacks to more than {limit} bytes")
        if name.startswith(CHECKPOINT_DIR + "/"):
            destination = target / _relative(name[len(CHECKPOINT_DIR) + 1:], where)
        elif name == ROOTFS_DIFF:
            destination = target / ROOTFS_DIFF
        elif name in TOP_LEVEL_FILES:
            continue  # describes the checkpoint for other tools; metadata.json is ours
        else:
            raise DataLoss(f"{where}: unexpected entry {name[:120]!r} in the layer")
        source = archive.extractfile(member)
        if source is None:
            raise DataLoss(f"{where}: {name[:120]!r} has no data")
        destination.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with source, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, _CHUNK)


def _relative(name: str, where: str) -> str:
    naming.relative_file(name, where)
    if PurePosixPath(name).parts[0] in (commit.DRAFT_FILE,) or name.startswith(commit.STAGING_PREFIX):
        raise DataLoss(f"{where}: {name[:120]!r} is not a checkpoint file")
    return name
