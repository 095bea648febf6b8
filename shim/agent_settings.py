"""Where the node agent listens, and the per-container Kybernate options.

Both come from the container's OCI spec annotations, because that is what every
client can reach (`ctr run --annotation K=V`, Kubernetes pod annotations through
CRI, a containerd config's runtime annotations):

| annotation | meaning |
|---|---|
| `io.kybernate.agent-socket` | the agent's unix socket |
| `io.kybernate.checkpoint.tcp-established` | dump established TCP connections |
| `io.kybernate.checkpoint.leave-running` | keep the container running after the dump |
| `io.kybernate.checkpoint.exit` | stop the container after the dump (the opposite) |
| `io.kybernate.checkpoint.gpu-lock-timeout-ms` | how long CUDA locking may take |
| `io.kybernate.checkpoint.rootfs-diff` | save the writable layer beside the images (default: the agent's, on; `false` opts out) |
| `io.kybernate.checkpoint.deadline-ms` | deadline of the whole pipeline |
| `io.kybernate.restore-from` | create restores this checkpoint (directory or registry name); `.NAME` appended: only the pod's container NAME; never a pod's sandbox |

The agent socket falls back to the environment (`KYBERNATE_AGENT_SOCKET`: containerd
passes its own environment to shims) and then to /run/kybernate/agent.sock.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kybernate.api.client import DEFAULT_SOCKET
from kybernate.errors import InvalidArgument

if TYPE_CHECKING:
    from kybernate.protos import agent_pb2
    from kybernate.shim.options import CheckpointRequestOptions

ANNOTATION_AGENT_SOCKET = "io.kybernate.agent-socket"
ANNOTATION_RESTORE_FROM = "io.kybernate.restore-from"
#: true: restore with CRIU's lazy pages (the task runs before its memory is in);
#: false: never; absent: the node agent's `[restore] lazy_pages`.
ANNOTATION_RESTORE_LAZY = "io.kybernate.restore.lazy"
CHECKPOINT_ANNOTATION_PREFIX = "io.kybernate.checkpoint."
ENV_AGENT_SOCKET = "KYBERNATE_AGENT_SOCKET"
#: Set by containerd's CRI plugin on every container of a pod: the pod's namespace.
POD_NAMESPACE_ANNOTATION = "io.kubernetes.cri.sandbox-namespace"
#: Set by CRI: "sandbox" for the pod's pause container, "container" for the others.
CRI_CONTAINER_TYPE_ANNOTATION = "io.kubernetes.cri.container-type"
CRI_SANDBOX_TYPE = "sandbox"
#: Set by CRI on a pod's containers: the container's name in the pod spec.
CRI_CONTAINER_NAME_ANNOTATION = "io.kubernetes.cri.container-name"

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_KNOWN_CHECKPOINT_KEYS = frozenset({
    "tcp-established", "leave-running", "exit", "gpu-lock-timeout-ms", "rootfs-diff", "deadline-ms",
})


def spec_annotations(spec: Mapping[str, Any]) -> Mapping[str, str]:
    """The spec's annotations (an empty mapping when it has none)."""
    value = spec.get("annotations") or {}
    if not isinstance(value, Mapping):
        raise InvalidArgument("OCI spec annotations must be an object")
    return value


def agent_socket(spec: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Path:
    """The agent socket for this container: annotation, environment, default."""
    env = os.environ if environ is None else environ
    value = spec_annotations(spec).get(ANNOTATION_AGENT_SOCKET) or env.get(ENV_AGENT_SOCKET) or DEFAULT_SOCKET
    path = Path(value)
    if not path.is_absolute():
        raise InvalidArgument(f"kybernate agent socket {value!r} must be an absolute path")
    return path


@dataclasses.dataclass(frozen=True)
class ContainerCheckpointSettings:
    """The container's checkpoint annotations; None/0 means "not set" (agent default)."""

    tcp_established: bool | None = None
    exit: bool | None = None
    gpu_lock_timeout_ms: int = 0
    #: None: the agent's default (the writable layer of an overlay root is saved).
    rootfs_diff: bool | None = None
    deadline_ms: int = 0


def _bool(key: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise InvalidArgument(f"annotation {key}={text!r}: want true or false")


def _millis(key: str, text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise InvalidArgument(f"annotation {key}={text!r}: want a whole number of milliseconds") from None
    if not 0 <= value < 1 << 32:
        raise InvalidArgument(f"annotation {key}={text!r}: out of range")
    return value


def checkpoint_settings(spec: Mapping[str, Any]) -> ContainerCheckpointSettings:
    """Parse the `io.kybernate.checkpoint.*` annotations; unknown or malformed ones are
    refused, so a typo never silently falls back to a default."""
    found = {key[len(CHECKPOINT_ANNOTATION_PREFIX):]: value
             for key, value in spec_annotations(spec).items() if key.startswith(CHECKPOINT_ANNOTATION_PREFIX)}
    for name in found:
        if name not in _KNOWN_CHECKPOINT_KEYS:
            raise InvalidArgument(f"unknown annotation {CHECKPOINT_ANNOTATION_PREFIX}{name}; known: "
                                  + ", ".join(sorted(_KNOWN_CHECKPOINT_KEYS)))

    def key(name: str) -> str:
        return CHECKPOINT_ANNOTATION_PREFIX + name

    exit_: bool | None = None
    if "exit" in found:
        exit_ = _bool(key("exit"), found["exit"])
    if "leave-running" in found:
        leave = _bool(key("leave-running"), found["leave-running"])
        if exit_ is not None and exit_ == leave:
            raise InvalidArgument(f"annotations {key('exit')} and {key('leave-running')} contradict each other")
        exit_ = not leave
    return ContainerCheckpointSettings(
        tcp_established=(_bool(key("tcp-established"), found["tcp-established"])
                         if "tcp-established" in found else None),
        exit=exit_,
        gpu_lock_timeout_ms=(_millis(key("gpu-lock-timeout-ms"), found["gpu-lock-timeout-ms"])
                             if "gpu-lock-timeout-ms" in found else 0),
        rootfs_diff=_bool(key("rootfs-diff"), found["rootfs-diff"]) if "rootfs-diff" in found else None,
        deadline_ms=_millis(key("deadline-ms"), found["deadline-ms"]) if "deadline-ms" in found else 0,
    )


def agent_checkpoint_options(settings: ContainerCheckpointSettings,
                             request: CheckpointRequestOptions) -> agent_pb2.CheckpointOptions:
    """The agent's options for one checkpoint.

    The request's options win where they ask for something (a proto3 bool cannot say
    "unset", so only `true` counts as asked); otherwise the annotations; otherwise the
    agent's node defaults (fields left unset).
    """
    from kybernate.protos import agent_pb2

    options = agent_pb2.CheckpointOptions(
        external_unix_sockets=request.external_unix_sockets, terminal=request.terminal,
        file_locks=request.file_locks,
        gpu_lock_timeout_ms=settings.gpu_lock_timeout_ms, deadline_ms=settings.deadline_ms)
    if settings.rootfs_diff is not None:
        options.rootfs_diff = settings.rootfs_diff
    if request.exit:
        options.exit = True
    elif settings.exit is not None:
        options.exit = settings.exit
    if request.open_tcp:
        options.open_tcp = True
    elif settings.tcp_established is not None:
        options.open_tcp = settings.tcp_established
    return options


def restore_lazy(spec: Mapping[str, Any]) -> bool | None:
    """The `io.kybernate.restore.lazy` annotation; None when absent (the node decides)."""
    text = spec_annotations(spec).get(ANNOTATION_RESTORE_LAZY)
    return None if text is None else _bool(ANNOTATION_RESTORE_LAZY, text)


def restore_from(spec: Mapping[str, Any]) -> str:
    """What this container restores from ("" when nothing): the annotation
    `io.kybernate.restore-from.<container name>`, else `io.kybernate.restore-from`.

    Through CRI a pod's annotations reach every container of the pod, its sandbox
    (pause) included: the sandbox never restores, and in a pod of several containers
    the per-container form says which one does."""
    annotations = spec_annotations(spec)
    if annotations.get(CRI_CONTAINER_TYPE_ANNOTATION) == CRI_SANDBOX_TYPE:
        return ""
    name = annotations.get(CRI_CONTAINER_NAME_ANNOTATION, "")
    if name:
        specific = annotations.get(f"{ANNOTATION_RESTORE_FROM}.{name}", "").strip()
        if specific:
            return specific
    return annotations.get(ANNOTATION_RESTORE_FROM, "").strip()
