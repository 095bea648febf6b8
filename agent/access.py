"""Who may restore what.

A checkpoint holds a process's whole memory, its secrets too. A restore by name or
id is allowed only to a container of the namespace the checkpoint was taken in (the
containerd namespace and, through CRI, the pod's Kubernetes namespace), unless an
operator shared it on purpose: with `kybernate checkpoint share` (kept in the
registry) or in the agent's configuration (`[[restore.share]]`, the same on every
node). Host directories named by an annotation are accepted only under the roots the
configuration allows. Refusals are PermissionDenied and say what and why.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kybernate.agent import naming
from kybernate.errors import InvalidArgument, PermissionDenied

#: A share with every namespace.
EVERY_NAMESPACE = "*"


@dataclasses.dataclass(frozen=True)
class Party:
    """A containerd namespace and, through CRI, a pod's Kubernetes namespace ("" for
    none): who took a checkpoint, or who restores one."""

    namespace: str
    pod_namespace: str = ""

    def __str__(self) -> str:
        where = f"namespace {self.namespace!r}"
        return f"{where} (pod namespace {self.pod_namespace!r})" if self.pod_namespace else where

    @classmethod
    def of_metadata(cls, metadata: Mapping[str, Any]) -> Party:
        container = metadata.get("container")
        container = container if isinstance(container, Mapping) else {}
        return cls(str(container.get("namespace", "")), str(container.get("pod_namespace", "")))


@dataclasses.dataclass(frozen=True, order=True)
class Share:
    """Who else may restore a checkpoint: a containerd namespace ("*": every one),
    within it optionally only one Kubernetes namespace ("": all of it)."""

    namespace: str
    pod_namespace: str = ""

    def __post_init__(self) -> None:
        if self.namespace == EVERY_NAMESPACE:
            if self.pod_namespace:
                raise InvalidArgument("a share with every namespace cannot name a pod namespace")
        else:
            naming.containerd_namespace(self.namespace)
        if self.pod_namespace:
            naming.kubernetes_namespace(self.pod_namespace)

    def admits(self, party: Party) -> bool:
        return (self.namespace in (EVERY_NAMESPACE, party.namespace)
                and self.pod_namespace in ("", party.pod_namespace))

    def __str__(self) -> str:
        return f"{self.namespace}/{self.pod_namespace}" if self.pod_namespace else self.namespace


@dataclasses.dataclass(frozen=True)
class ConfiguredShare:
    """A share from the agent's configuration: `checkpoint` is an id or a
    "namespace/name"."""

    checkpoint: str
    share: Share

    def applies_to(self, checkpoint_id: str, qualified_name: str) -> bool:
        return self.checkpoint in (checkpoint_id, qualified_name)


def check_restore(what: str, owner: Party, requester: Party, shares: Iterable[Share]) -> None:
    """PermissionDenied unless `requester` took the checkpoint or it is shared with it."""
    if owner == requester or any(share.admits(requester) for share in shares):
        return
    raise refusal(what, owner, requester)


def refusal(what: str, owner: Party, requester: Party) -> PermissionDenied:
    return PermissionDenied(
        f"restore of {what} refused: it was taken in {owner} and is not shared with {requester}"
        " (an operator can share it: kybernate checkpoint share)")


def configured_shares(configured: Sequence[ConfiguredShare], checkpoint_id: str,
                      qualified_name: str) -> list[Share]:
    return [c.share for c in configured if c.applies_to(checkpoint_id, qualified_name)]


def allowed_directory(directory: Path, roots: Sequence[Path], *, forbidden: Sequence[Path] = ()) -> Path:
    """The real path of a host directory an annotation named, if it lies under one of
    `roots` (symlinks resolved) and under none of `forbidden` (the agent's own tiers:
    those are restored by name, with the namespace check)."""
    if not directory.is_absolute():
        raise PermissionDenied(f"restore from {directory} refused: not an absolute path")
    real = Path(os.path.realpath(directory))
    for inner in forbidden:
        if _within(real, Path(os.path.realpath(inner))):
            raise PermissionDenied(f"restore from {directory} refused: it is inside the agent's own {inner};"
                                   " restore its checkpoints by name")
    if not any(_within(real, Path(os.path.realpath(root))) for root in roots):
        allowed = ", ".join(str(root) for root in roots) or "none are configured"
        raise PermissionDenied(f"restore from {directory} refused: host directories are accepted only"
                               f" under the roots in the agent's [restore] allowed_roots ({allowed})")
    return real


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
