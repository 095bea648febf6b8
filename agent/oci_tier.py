"""OCI registries as a place for checkpoints: export (push a checkpoint image), import
(pull, verify, record), and `io.kybernate.restore-from=oci:REF` restores.

Which registries: `[oci] registries` in the agent's configuration; any other is refused
before a request is sent (a restore annotation must not make the agent fetch from, or
publish a process's memory to, a host the operator never named). Plain HTTP only for
those in `[oci] plain_http`.

Who may restore an imported checkpoint: the namespace that imported it. A restore by
annotation imports into the restoring container's namespace; the image's own
namespace (an annotation of whoever pushed it) is recorded, never trusted. Pulling an
image again whose digest a namespace already imported reuses the local copy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
from datetime import UTC, datetime
from typing import Any

import kybernate
from kybernate.agent import commit, naming, oci_image
from kybernate.agent.access import Party
from kybernate.agent.config import AgentConfig
from kybernate.agent.fetch import fetch_path
from kybernate.agent.inuse import InUse
from kybernate.agent.local_tier import LocalTier
from kybernate.agent.metrics import AgentMetrics
from kybernate.agent.oci_registry import Reference, RegistryClient
from kybernate.agent.registry import CheckpointRow, CheckpointState, Registry, Tier
from kybernate.agent.transfer import TransferMeter
from kybernate.api import layout
from kybernate.errors import FailedPrecondition, NotFound, PermissionDenied

log = logging.getLogger(__name__)

#: How an annotation names a checkpoint image: `io.kybernate.restore-from=oci:REF`.
OCI_SCHEME = "oci:"


@dataclasses.dataclass(frozen=True)
class Imported:
    row: CheckpointRow
    digest: str
    reused: bool


class OciTier:
    def __init__(self, config: AgentConfig, registry: Registry, local: LocalTier, inuse: InUse,
                 metrics: AgentMetrics, *, criu_version: str | None) -> None:
        self._config = config
        self._registry = registry
        self._local = local
        self._inuse = inuse
        self._metrics = metrics
        self._criu_version = criu_version
        self._importing = asyncio.Lock()

    def client(self, reference: Reference) -> RegistryClient:
        if reference.registry not in self._config.oci_registries:
            named = ", ".join(self._config.oci_registries) or "none are"
            raise PermissionDenied(f"registry {reference.registry} is not one the agent may use ({named}"
                                   " configured in [oci] registries)")
        return RegistryClient(reference.registry, plain_http=reference.registry in self._config.oci_plain_http)

    async def export(self, checkpoint: str, image: str, meter: TransferMeter) -> tuple[CheckpointRow, str]:
        """Push a committed local checkpoint as a checkpoint image; its record and the
        manifest's digest. The files are verified first: a registry gets nothing
        this node could not restore itself."""
        reference = Reference.parse(image)
        client = self.client(reference)
        row = await self._registry.lookup(checkpoint)
        if row.state is not CheckpointState.COMMITTED or not self._local.has(row.id):
            raise FailedPrecondition(f"export of {row.qualified_name} ({row.id}): only a committed checkpoint in"
                                     " the local tier can be exported (fetch it first)")
        directory = self._local.committed(row.id)
        with self._inuse.using(row.id, f"export to {reference}"):
            meter.begin("verifying", row.size_bytes)
            metadata = await asyncio.to_thread(commit.verify, directory, progress=meter.add)
            started = asyncio.get_running_loop().time()
            meter.begin("pushing", 0)
            digest = await asyncio.to_thread(oci_image.push, client, reference, directory, metadata,
                                             agent_version=kybernate.__version__, progress=meter.add,
                                             on_total=meter.set_total)
            self._metrics.data_moved("export", meter.snapshot().done_bytes,
                                     asyncio.get_running_loop().time() - started)
        log.info("checkpoint %s (%s) exported to %s@%s", row.id, row.qualified_name, reference, digest)
        return row, digest

    async def import_image(self, image: str, owner: Party, name: str, meter: TransferMeter) -> Imported:
        """Pull a checkpoint image into the local tier, verified, as `owner`'s."""
        reference = Reference.parse(image)
        client = self.client(reference)
        naming.containerd_namespace(owner.namespace)
        if owner.pod_namespace:
            naming.kubernetes_namespace(owner.pod_namespace)
        manifest, digest = await asyncio.to_thread(client.get_manifest, reference)
        layer = oci_image.checkpoint_layer(manifest, reference)
        # Names are unique per containerd namespace: pods of two Kubernetes namespaces
        # that restore one image each get their own copy.
        derived = f"oci-{digest.removeprefix('sha256:')[:16]}"
        if owner.pod_namespace:
            derived += f"-{owner.pod_namespace}"
        name = naming.checkpoint_name(name or derived)
        async with self._importing:  # one import at a time: two restores of one image share it
            existing = await self._reusable(owner, name, digest)
            if existing is not None:
                return Imported(existing, digest, True)
            checkpoint_id = naming.new_checkpoint_id()
            staging = fetch_path(self._local, checkpoint_id)  # start-up recovery removes leftovers
            started = asyncio.get_running_loop().time()
            try:
                meter.begin("pulling", layer.size)
                self._local.prepare()
                await asyncio.to_thread(oci_image.pull_into, client, reference, layer, staging,
                                        max_bytes=self._local.free_bytes(), progress=meter.add)
                meter.begin("verifying", 0)
                metadata = await asyncio.to_thread(self._verify_staged, staging, meter)
                metadata = _as_imported(metadata, checkpoint_id, name, owner, reference, digest)
                await asyncio.to_thread(_seal, staging, self._local.committed(checkpoint_id), metadata)
            finally:
                if staging.exists():
                    await asyncio.to_thread(shutil.rmtree, staging, True)
            self._metrics.data_moved("import", layer.size, asyncio.get_running_loop().time() - started)
            row = CheckpointRow.from_metadata(metadata, tier=Tier.LOCAL, dirty=False)
            recorded = await self._registry.add_committed(row)
        log.info("imported %s@%s as checkpoint %s (%s)", reference, digest, recorded.id, recorded.qualified_name)
        return Imported(recorded, digest, False)

    def _verify_staged(self, staging: Any, meter: TransferMeter) -> dict[str, Any]:
        document = commit.read_metadata(staging)
        meter.set_total(sum(int(f["size"]) for f in document["files"].values()))
        return commit.verify(staging, criu_version=self._criu_version, progress=meter.add)

    async def _reusable(self, owner: Party, name: str, digest: str) -> CheckpointRow | None:
        try:
            row = await self._registry.find(owner.namespace, name)
        except NotFound:
            return None
        if row.state is not CheckpointState.COMMITTED or not self._local.has(row.id):
            return None
        metadata = await asyncio.to_thread(commit.read_metadata, self._local.committed(row.id))
        imported = metadata.get("imported_from")
        if not isinstance(imported, dict) or imported.get("digest") != digest or row.owner != owner:
            raise FailedPrecondition(f"namespace {owner.namespace!r} already has a checkpoint named {name!r}"
                                     " that is not this image")
        return row


def _as_imported(metadata: dict[str, Any], checkpoint_id: str, name: str, owner: Party, reference: Reference,
                 digest: str) -> dict[str, Any]:
    """The metadata of the local copy: a new id and name, the importing namespace as
    its owner, and where it came from."""
    container = dict(metadata.get("container") or {})
    imported_from = {"reference": str(reference), "digest": digest, "id": metadata.get("id"),
                     "namespace": container.get("namespace"), "pod_namespace": container.get("pod_namespace"),
                     "imported_at": datetime.now(UTC).isoformat()}
    container.update(namespace=owner.namespace, pod_namespace=owner.pod_namespace)
    return {**metadata, "id": checkpoint_id, "name": name, "container": container, "imported_from": imported_from}


def _seal(staging: Any, final: Any, metadata: dict[str, Any]) -> None:
    """Rewrite metadata.json (its file list unchanged), then rename into place."""
    temporary = staging / (layout.METADATA_FILE + ".new")
    commit.write_json_durably(temporary, metadata)
    os.rename(temporary, staging / layout.METADATA_FILE)
    commit.fsync_directory(staging)
    os.rename(staging, final)
    commit.fsync_directory(final.parent)
