"""A checkpoint request, validated into a plan before anything touches the container
(the phase `accepted`): the pid is alive, the bundle readable, the destination
writable, the names well-formed, the writable layer where it is asked for, and enough
disk for what the dump will write."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil
from kybernate.agent import naming, work_path, writable_layer
from kybernate.agent.config import AgentConfig
from kybernate.agent.local_tier import LocalTier
from kybernate.errors import (
    FailedPrecondition,
    InvalidArgument,
    KybernateError,
    NotFound,
    ResourceExhausted,
)
from kybernate.protos import agent_pb2
from kybernate.runtime.cgroups import Cgroup

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckpointPlan:
    """A validated request."""

    checkpoint_id: str
    name: str
    container_id: str
    namespace: str
    pod_namespace: str
    bundle: Path
    runc_root: str
    init_pid: int
    destination: Path | None
    exit: bool
    open_tcp: bool
    external_unix_sockets: bool
    terminal: bool
    file_locks: bool
    rootfs_upperdir: Path | None
    gpu_lock_timeout_ms: int
    deadline_s: float | None
    image_ref: str
    labels: Mapping[str, str]
    memory_estimate: int
    #: Where CRIU's dump.log and stats-dump go besides (the client's work path).
    client_work_path: Path | None = None
    # The caller (the shim) goes on at EXPORTED; the commit follows on its own.
    return_after_export: bool = False

    def options_record(self) -> dict[str, Any]:
        return {
            "exit": self.exit, "open_tcp": self.open_tcp,
            "external_unix_sockets": self.external_unix_sockets, "terminal": self.terminal,
            "file_locks": self.file_locks, "rootfs_diff": self.rootfs_upperdir is not None,
            "gpu_lock_timeout_ms": self.gpu_lock_timeout_ms,
        }


def _container_rss(pid: int) -> int:
    """Resident memory of every process in the container's cgroup: what a dump writes."""
    try:
        pids = list(Cgroup.for_pid(pid).pids())
    except (KybernateError, OSError):
        pids = [pid]
    total = 0
    for p in pids:
        try:
            total += psutil.Process(p).memory_info().rss
        except psutil.Error:
            continue
    return total


def check_disk(local: LocalTier, config: AgentConfig, needed: int, container_id: str) -> None:
    """ResourceExhausted unless the local tier keeps `min_free_bytes` after `needed` more."""
    free = local.free_bytes()
    if free - needed < config.min_free_bytes:
        raise ResourceExhausted(
            f"checkpoint of {container_id}: {local.root} has {free} bytes free; the dump needs"
            f" about {needed} and {config.min_free_bytes} must stay free")


def _writable_layer(request: agent_pb2.CheckpointRequest, config: AgentConfig, pid: int) -> Path | None:
    """The overlay upperdir to save beside the images, or None.

    Saved by default: a process with a file of its writable layer open restores only
    where that file exists again (CRIU: "Can't open file ... on restore"). Asked for
    explicitly, a root that is not an overlay is refused; by default it is dumped
    without a writable layer (a bind-mounted root has nothing to save)."""
    options = request.options
    asked = options.HasField("rootfs_diff")
    if not (options.rootfs_diff if asked else config.default_rootfs_diff):
        return None
    upperdir = writable_layer.overlay_upperdir(pid)
    if upperdir is not None and upperdir.is_dir():
        return upperdir
    if asked:
        raise FailedPrecondition(
            f"checkpoint of {request.container_id}: rootfs_diff asked, but its root is not an overlay mount")
    log.info("checkpoint of %s: its root is not an overlay mount; no writable layer to save",
             request.container_id)
    return None


def plan_checkpoint(request: agent_pb2.CheckpointRequest, config: AgentConfig, local: LocalTier) -> CheckpointPlan:
    """Validate a request without touching the container (phase `accepted`)."""
    if not request.container_id:
        raise InvalidArgument("checkpoint: container_id is required")
    if request.init_pid <= 0:
        raise InvalidArgument(f"checkpoint of {request.container_id}: init_pid is required")
    pid = int(request.init_pid)
    if not psutil.pid_exists(pid):
        raise NotFound(f"checkpoint of {request.container_id}: init pid {pid} is not running")
    bundle = Path(request.bundle)
    if not bundle.is_absolute() or not os.access(bundle / "config.json", os.R_OK):
        raise FailedPrecondition(f"checkpoint of {request.container_id}: bundle {bundle} has no readable config.json")
    destination = Path(request.destination) if request.destination else None
    if destination is not None:
        if not destination.is_absolute():
            raise InvalidArgument(f"checkpoint destination {destination} must be absolute")
        probe = destination if destination.exists() else destination.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            raise FailedPrecondition(f"checkpoint destination {destination} is not writable")
    client_work_path = work_path.client_work_path(request.work_path, request.container_id)
    if request.namespace:
        naming.containerd_namespace(request.namespace)
    if request.pod_namespace:
        naming.kubernetes_namespace(request.pod_namespace)
    checkpoint_id = naming.new_checkpoint_id()
    # The default name carries the id: unique without relying on the clock's second.
    name = naming.checkpoint_name(request.name or f"{request.container_id}-{checkpoint_id}")

    options = request.options
    upperdir = _writable_layer(request, config, pid)

    memory = _container_rss(pid)
    local.prepare()
    check_disk(local, config, memory, request.container_id)

    return CheckpointPlan(
        checkpoint_id=checkpoint_id, name=name, container_id=request.container_id,
        namespace=request.namespace, pod_namespace=request.pod_namespace, bundle=bundle, runc_root=request.runc_root, init_pid=pid,
        destination=destination, client_work_path=client_work_path,
        exit=options.exit if options.HasField("exit") else not config.default_leave_running,
        open_tcp=options.open_tcp if options.HasField("open_tcp") else config.default_open_tcp,
        external_unix_sockets=options.external_unix_sockets, terminal=options.terminal,
        file_locks=options.file_locks, rootfs_upperdir=upperdir,
        gpu_lock_timeout_ms=options.gpu_lock_timeout_ms or config.gpu_lock_timeout_ms,
        deadline_s=options.deadline_ms / 1000 if options.deadline_ms else None,
        image_ref=request.image_ref, labels=dict(request.labels), memory_estimate=memory,
        return_after_export=request.return_after_export,
    )
