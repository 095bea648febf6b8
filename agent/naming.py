"""Names that become paths or object keys: checkpoint ids and names, namespaces, node
names, and the relative file paths a checkpoint's metadata lists.

Each of these can arrive from outside the agent (a request, an annotation, a bucket's
name index, a `metadata.json` from an archive or another node), so each is checked
here before anything uses it to build a path, an S3 key or a registry decision. A
refusal is InvalidArgument (or DataLoss for a checkpoint's own metadata) naming the
value and the rule it broke.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import PurePosixPath

from kybernate.errors import DataLoss, InvalidArgument

#: A new id: UTC time to the microsecond, then 64 random bits. Unique without relying
#: on the clock (two checkpoints in one microsecond, two nodes writing to one bucket),
#: and ids still sort by creation time.
_ID = re.compile(r"^[0-9]{8}T[0-9]{6}([0-9]{6})?Z-[0-9a-f]{8}([0-9a-f]{8})?$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
#: containerd's own rule for namespaces.
_CONTAINERD_NAMESPACE = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")
CONTAINERD_NAMESPACE_MAX = 76
#: A Kubernetes namespace is a DNS-1123 label.
_KUBERNETES_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
#: Node names (Kubernetes node names are DNS-1123 subdomains).
_NODE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
#: An OCI registry host: a DNS name or IPv4 address, an optional port.
_REGISTRY_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?(:[0-9]{1,5})?$")
#: OCI distribution's repository names and tags.
_REPOSITORY = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_PATH_MAX = 4096
_COMPONENT_MAX = 255


def new_checkpoint_id() -> str:
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    return f"{stamp}{int(now % 1 * 1_000_000):06d}Z-{os.urandom(8).hex()}"


def is_checkpoint_id(value: str) -> bool:
    return bool(_ID.match(value))


def checkpoint_id(value: str) -> str:
    """`value` if it is a well-formed checkpoint id; InvalidArgument otherwise."""
    if not is_checkpoint_id(value):
        raise InvalidArgument(f"{value[:80]!r} is not a checkpoint id")
    return value


def checkpoint_name(value: str) -> str:
    if not _NAME.match(value):
        raise InvalidArgument(f"checkpoint name {value[:80]!r}: use up to 200 letters, digits, '.', '_'"
                              " and '-', starting with a letter or digit")
    return value


def containerd_namespace(value: str) -> str:
    if len(value) > CONTAINERD_NAMESPACE_MAX or not _CONTAINERD_NAMESPACE.match(value):
        raise InvalidArgument(f"{value[:80]!r} is not a containerd namespace")
    return value


def container_id(value: str) -> str:
    """A containerd container id (containerd's identifier rule, as namespaces)."""
    if len(value) > CONTAINERD_NAMESPACE_MAX or not _CONTAINERD_NAMESPACE.match(value):
        raise InvalidArgument(f"{value[:80]!r} is not a containerd container id")
    return value


def kubernetes_namespace(value: str) -> str:
    if not _KUBERNETES_NAMESPACE.match(value):
        raise InvalidArgument(f"{value[:80]!r} is not a Kubernetes namespace")
    return value


def node_name(value: str) -> str:
    if not _NODE.match(value):
        raise InvalidArgument(f"node name {value[:80]!r}: use lower-case letters, digits, '-' and '.'")
    return value


def relative_file(value: object, where: str) -> str:
    """A path listed in a checkpoint's metadata: relative, normalised, inside its
    directory. Anything else is DataLoss: the metadata cannot be trusted."""
    if not isinstance(value, str) or not value or len(value) > _PATH_MAX or "\0" in value:
        raise DataLoss(f"{where}: file entry {str(value)[:80]!r} is not a relative path")
    path = PurePosixPath(value)
    if (path.is_absolute() or str(path) != value or "\\" in value
            or any(part in ("", ".", "..") or len(part) > _COMPONENT_MAX for part in path.parts)):
        raise DataLoss(f"{where}: file entry {value[:80]!r} would lead outside the checkpoint directory")
    return value


def registry_host(value: str) -> str:
    if not _REGISTRY_HOST.match(value) or (":" in value and not 0 < int(value.rpartition(":")[2]) < 65536):
        raise InvalidArgument(f"{value[:80]!r} is not a registry host (host or host:port)")
    return value


def repository(value: str) -> str:
    if len(value) > 255 or not _REPOSITORY.match(value):
        raise InvalidArgument(f"{value[:80]!r} is not an OCI repository name (lower-case path components)")
    return value


def image_tag(value: str) -> str:
    if not _TAG.match(value):
        raise InvalidArgument(f"{value[:80]!r} is not an OCI tag")
    return value


def digest(value: str) -> str:
    if not _DIGEST.match(value):
        raise InvalidArgument(f"{value[:80]!r} is not a sha256 digest")
    return value
