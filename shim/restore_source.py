"""Where a restore comes from, told apart so the agent can apply the right trust.

Three ways in:
- containerd's: `CreateTaskRequest.checkpoint` names the directory containerd
  unpacked the checkpoint into (`ctr container restore --live`); Kybernate removes
  that directory once the restore has consumed it (containerd 1.7 never does, and each
  one is a full copy of the images);
- the spec annotation `io.kybernate.restore-from` naming a registry checkpoint (an
  id, a name in the container's namespace, or namespace/name): the Kubernetes path;
  the agent restores it only into the namespace that took it, or one it was shared
  with;
- the same annotation naming a host directory (absolute path): only under the roots
  the agent's configuration allows.
`SpecRestoreSource` turns the annotation into the init's checkpoint (marked with a
prefix), so Create prepares a restore instead of `runc create`; `prepare_request`
turns that into the agent's request.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from kybernate.errors import FailedPrecondition, InvalidArgument
from kybernate.oci import load_spec
from kybernate.shim.agent_settings import restore_from

if TYPE_CHECKING:
    from kybernate.protos import agent_pb2, shim_pb2

#: Marks a registry checkpoint (id, name or namespace/name) in `InitProcess.checkpoint_dir`.
REGISTRY_PREFIX = "kybernate-checkpoint:"
#: Marks a host directory an annotation named (not containerd's own directory).
HOST_DIRECTORY_PREFIX = "kybernate-directory:"
#: The prefix of the temporary directories containerd unpacks checkpoints into.
CONTAINERD_CHECKPOINT_PREFIX = "ctrd-checkpoint"


class SpecRestoreSource:
    """Create's seam: a container annotated `io.kybernate.restore-from` is created as
    a restore of that checkpoint (the Kubernetes path, where there is no ctr)."""

    def checkpoint_for(self, request: shim_pb2.CreateTaskRequest) -> str:
        """What the init should restore from ("" for an ordinary create)."""
        if request.checkpoint:
            return request.checkpoint
        source = restore_from(load_spec(Path(request.bundle)))
        if not source:
            return ""
        return HOST_DIRECTORY_PREFIX + source if os.path.isabs(source) else REGISTRY_PREFIX + source


def prepare_request(source: str, namespace: str, pod_namespace: str) -> agent_pb2.PrepareRestoreRequest:
    """The agent's PrepareRestore request for the init's `checkpoint_dir`: a registry
    checkpoint, a host directory, or containerd's own (which must hold a Kybernate
    checkpoint)."""
    from kybernate.protos import agent_pb2

    request = agent_pb2.PrepareRestoreRequest(namespace=namespace, pod_namespace=pod_namespace)
    if source.startswith(REGISTRY_PREFIX):
        reference = source[len(REGISTRY_PREFIX):]
        if not reference:
            raise InvalidArgument("restore: empty checkpoint name")
        request.checkpoint = reference
        return request
    if source.startswith(HOST_DIRECTORY_PREFIX):
        request.host_directory = source[len(HOST_DIRECTORY_PREFIX):]
        return request
    directory = Path(source)
    if not directory.is_dir():
        raise FailedPrecondition(f"restore: checkpoint directory {directory} does not exist")
    # Without metadata.json (runc's images) the agent verifies it as a foreign checkpoint.
    request.directory = str(directory)
    return request


def containerd_checkpoint_dir(source: str) -> Path | None:
    """The directory if `source` is one containerd unpacked a checkpoint into for this
    restore (a `ctrd-checkpoint*` directory in its runtime or temporary directory)."""
    if not source or source.startswith((REGISTRY_PREFIX, HOST_DIRECTORY_PREFIX)):
        return None
    directory = Path(source)
    homes = {Path(os.environ[k]) for k in ("XDG_RUNTIME_DIR", "TMPDIR") if os.environ.get(k)}
    homes.add(Path(tempfile.gettempdir()))
    if directory.name.startswith(CONTAINERD_CHECKPOINT_PREFIX) and directory.parent in homes:
        return directory
    return None
