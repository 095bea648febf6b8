"""The Kubernetes manifests in packaging/: valid against the Kubernetes API schemas
(kubernetes-validate bundles them), and the agent's DaemonSet mounts every host path
its own configuration and containerd hand it, at the same path."""

from __future__ import annotations

import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as k8s_schemas
from kybernate.agent.config import config_from_mapping

PACKAGING = Path(__file__).resolve().parents[2] / "packaging"
MANIFESTS = sorted((PACKAGING / "kubernetes").glob("*.yaml"))
#: The oldest Kubernetes these manifests are checked against, and the newest the
#: validator knows. RuntimeClass node.k8s.io/v1 is GA since 1.20.
KUBERNETES_VERSIONS = ("1.25.0", k8s_schemas.latest_version())
#: Paths containerd and its shims hand the agent, beyond those of its configuration:
#: bundles and runc state, overlay snapshots and CRI's checkpoint/restore directories,
#: containerd's checkpoint temporary directories, the cgroup tree.
CONTAINERD_PATHS = ("/run/containerd/io.containerd.runtime.v2.task", "/run/containerd/runc",
                    "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs",
                    "/var/lib/containerd/io.containerd.grpc.v1.cri/containers",
                    "/tmp/ctrd-checkpoint123", "/sys/fs/cgroup/freezer")


def documents() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in MANIFESTS:
        found += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def test_there_are_manifests() -> None:
    kinds = {doc["kind"] for _, doc in documents()}
    assert {"RuntimeClass", "DaemonSet", "ConfigMap", "Pod"} <= kinds


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(version: str) -> None:
    for path, doc in documents():
        try:
            k8s_schemas.validate(doc, version, strict=True)
        except k8s_schemas.ValidationError as err:
            raise AssertionError(f"{path.name}: {doc['kind']} {doc['metadata']['name']} is invalid "
                                 f"for Kubernetes {version}: {err.message}") from None


def _one(kind: str) -> dict[str, Any]:
    (doc,) = [doc for _, doc in documents() if doc["kind"] == kind]
    return doc


def test_daemonset_mounts_every_host_path_the_agent_needs() -> None:
    daemonset, config_map = _one("DaemonSet"), _one("ConfigMap")
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["hostPID"] is True
    (agent,) = spec["containers"]
    assert agent["securityContext"]["privileged"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    host_mounts: dict[PurePosixPath, PurePosixPath] = {}  # mount path -> host path
    for mount in agent["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "hostPath" in volume:
            host_mounts[PurePosixPath(mount["mountPath"])] = PurePosixPath(volume["hostPath"]["path"])
        elif "configMap" in volume:
            assert volume["configMap"]["name"] == config_map["metadata"]["name"]
            config_dir = PurePosixPath(mount["mountPath"])
    assert f"{config_dir}/agent.toml" in agent["args"]
    config = config_from_mapping(tomllib.loads(config_map["data"]["agent.toml"]))
    needed = [str(config.socket.parent), str(config.state_dir), str(config.local_tier),
              *(str(root) for root in config.restore_allowed_roots), *CONTAINERD_PATHS]
    for path in map(PurePosixPath, needed):
        holders = [m for m in host_mounts if m == path or m in path.parents]
        assert holders, f"{path} is not mounted from the host into the agent"
        # Mounted at its own path: the shims send host paths.
        assert all(host_mounts[m] == m for m in holders), f"{path} is mounted elsewhere"


def test_runtime_class_names_the_handler_of_the_containerd_snippets() -> None:
    handler = _one("RuntimeClass")["handler"]
    for snippet, plugin in (("containerd-1.7.toml", "io.containerd.grpc.v1.cri"),
                            ("containerd-2.toml", "io.containerd.cri.v1.runtime")):
        config = tomllib.loads((PACKAGING / "containerd" / snippet).read_text())
        runtime = config["plugins"][plugin]["containerd"]["runtimes"][handler]
        assert runtime["runtime_type"] == "io.containerd.kybernate.v1"
    pod = _one("Pod")
    assert pod["spec"]["runtimeClassName"] == _one("RuntimeClass")["metadata"]["name"]
