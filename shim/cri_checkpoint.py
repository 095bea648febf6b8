"""Where containerd 2.x's CRI archives a checkpoint: so CRIU's log and statistics land in it.

Kubelet's checkpoint API (CRI CheckpointContainer) on containerd 2.1 works like this
(internal/cri/server/container_checkpoint_linux.go):

1. it makes `<cri root>/containers/<container id>/ctrd-checkpoint` afresh (mode 0700);
2. it calls the task's Checkpoint; only a runtime named io.containerd.runc.v2 is told,
   through runc's CheckpointOptions.work_path, to let CRIU write `dump.log` and
   `stats-dump` into that directory; any other runtime gets no options at all;
3. it unpacks the images containerd packed from the task's `path` into
   `ctrd-checkpoint/checkpoint/`, the writable layer into `rootfs-diff.tar`, the spec
   into `spec.dump`, copies the container's `status`, writes `config.dump` and
   `status.dump`, and archives the directory whole to the kubelet's location.

`checkpointctl inspect --stats` reads `stats-dump` from the top of that archive. So the
shim finds the directory itself: `<cri root>` is where CRI keeps the pod's sandbox
files, which it bind-mounts into every container of the pod (`/etc/hosts`,
`/etc/hostname`, `/etc/resolv.conf` from `<cri root>/sandboxes/<sandbox id>/`). The
directory counts only while it exists as a real directory (not a symlink) owned by
root and closed to others: outside a CheckpointContainer call it does not exist, and
the checkpoint then goes without it. The agent, which writes there, checks it again.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

#: CRI's annotation naming the pod sandbox of a container.
SANDBOX_ID_ANNOTATION = "io.kubernetes.cri.sandbox-id"
#: The files CRI bind-mounts from the sandbox's directory into each container.
SANDBOX_FILES = {"/etc/hosts": "hosts", "/etc/hostname": "hostname", "/etc/resolv.conf": "resolv.conf"}
#: The directory CRI makes for a CheckpointContainer call, under the container's own.
CRI_CHECKPOINT_DIR = "ctrd-checkpoint"


def cri_root_of(spec: Mapping[str, Any]) -> Path | None:
    """CRI's root directory, from the sandbox files bind-mounted into the container."""
    annotations = spec.get("annotations") or {}
    sandbox_id = annotations.get(SANDBOX_ID_ANNOTATION, "") if isinstance(annotations, Mapping) else ""
    if not isinstance(sandbox_id, str) or not sandbox_id or "/" in sandbox_id or sandbox_id in (".", ".."):
        return None
    for mount in spec.get("mounts") or []:
        if not isinstance(mount, Mapping):
            continue
        name = SANDBOX_FILES.get(str(mount.get("destination", "")))
        source = PurePosixPath(str(mount.get("source", "")))
        if (name and source.is_absolute() and ".." not in source.parts and len(source.parts) > 4
                and source.parts[-3:] == ("sandboxes", sandbox_id, name)):
            return Path(*source.parts[:-3])
    return None


def cri_checkpoint_dir(spec: Mapping[str, Any], container_id: str) -> Path | None:
    """The directory CRI is archiving a checkpoint of this container from, while it
    does; None for any other checkpoint."""
    root = cri_root_of(spec)
    if root is None or not container_id or "/" in container_id or container_id in (".", ".."):
        return None
    candidate = root / "containers" / container_id / CRI_CHECKPOINT_DIR
    try:
        info = os.lstat(candidate)
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o077:
        return None
    return candidate
