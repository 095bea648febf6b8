"""A checkpoint's metadata document: what `metadata.json` records besides its file list
(which the commit adds from what is on disk), and the host versions it names."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from kybernate.agent.plan import CheckpointPlan


@dataclasses.dataclass(frozen=True)
class HostVersions:
    kernel: str
    criu: str
    runc: str
    cuda_driver: str = ""


def checkpoint_metadata(plan: CheckpointPlan, versions: HostVersions, *, cuda_backend: str,
                        cuda_inventory: Mapping[str, Any], cuda_pids: list[int],
                        cuda_steps: Mapping[str, Any], timings_ms: Mapping[str, int]) -> dict[str, Any]:
    """The metadata of one checkpoint as far as it has got (a draft has it too)."""
    return {
        "id": plan.checkpoint_id,
        "name": plan.name,
        "created_at": datetime.now(UTC).isoformat(),
        "container": {"id": plan.container_id, "namespace": plan.namespace,
                      "pod_namespace": plan.pod_namespace, "image": plan.image_ref,
                      "labels": dict(plan.labels), "bundle": str(plan.bundle)},
        "host": {"kernel": versions.kernel, "criu_version": versions.criu,
                 "runc_version": versions.runc},
        "cuda": {**cuda_inventory, "backend": cuda_backend, "pids": cuda_pids,
                 "driver_version": versions.cuda_driver, "steps": dict(cuda_steps)},
        "options": plan.options_record(),
        "timings_ms": dict(timings_ms),
    }
