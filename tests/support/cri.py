"""A CRI client for the tests, speaking to a private containerd as kubelet does.

The stubs are generated at test setup from the CRI `api.proto` (runtime.v1) of
Debian's golang-k8s-cri-api-dev, which `.ci/install-system.sh` unpacks into
/opt/kybernate/upstream/cri-api: no generated code of another project is kept in the
repository. The containerd side is `kybernate.sandbox.containerd` with `CriSettings`:
the `kybernate` handler (io.containerd.kybernate.v1) and the `runc` handler, each with
runc's state under the instance's own directory, a host-network pod at a time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

from kybernate.sandbox.containerd import (
    KYBERNATE_RUNTIME,
    Containerd,
    ContainerdRelease,
    CriRuntime,
    CriSettings,
    cgroups_named,
)
from kybernate.sandbox.images import (
    BUSYBOX_IMAGE_REF,
    PAUSE_IMAGE_REF,
    build_pause_archive,
    import_image,
)

CRI_API_PROTO = Path(
    "/opt/kybernate/upstream/cri-api/usr/share/gocode/src/k8s.io/cri-api/pkg/apis/runtime/v1/"
    "api.proto"
)
# The name the staged copy is compiled under: it names the generated modules and the
# file registered in protobuf's descriptor pool.
STAGED_PROTO_NAME = "kybernate_test_cri_api"
KYBERNATE_HANDLER = "kybernate"
RUNC_HANDLER = "runc"
# The pod namespace of the tests' pods (Kubernetes' namespace, not containerd's).
POD_NAMESPACE = "kyb-test"
CALL_TIMEOUT_S = 120.0


def load_cri_api(work_dir: Path) -> tuple[ModuleType, ModuleType]:
    """Generate the CRI stubs into `work_dir` and import them: (messages, grpc stubs).

    Loaded once per process: a second load would register runtime.v1 twice."""
    messages_name, grpc_name = f"{STAGED_PROTO_NAME}_pb2", f"{STAGED_PROTO_NAME}_pb2_grpc"
    if messages_name in sys.modules and grpc_name in sys.modules:
        return sys.modules[messages_name], sys.modules[grpc_name]
    if not CRI_API_PROTO.is_file():
        raise FileNotFoundError(f"{CRI_API_PROTO} is missing: run .ci/install-system.sh")
    from grpc_tools import protoc

    work_dir.mkdir(parents=True, exist_ok=True)
    staged = work_dir / f"{STAGED_PROTO_NAME}.proto"
    shutil.copyfile(CRI_API_PROTO, staged)
    well_known = resources.files("grpc_tools") / "_proto"
    code = protoc.main(["protoc", f"-I{work_dir}", f"-I{well_known}",
                        f"--python_out={work_dir}", f"--grpc_python_out={work_dir}",
                        str(staged)])
    if code != 0:
        raise RuntimeError(f"protoc failed on {CRI_API_PROTO} (exit {code})")
    loaded = []
    # The grpc module imports the messages by their top-level name: register it first.
    for name in (messages_name, grpc_name):
        spec = importlib.util.spec_from_file_location(name, work_dir / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        loaded.append(module)
    return loaded[0], loaded[1]


def cri_settings(base: Path, cgroup_parent: str) -> CriSettings:
    """A CRI containerd's handlers: `runc` and `kybernate`, runc's state under `base`."""
    runc_root = str(base / "runc")
    shim_options = base / "kybernate-shim.toml"
    # What CRI hands the Kybernate shim (runtimeoptions.v1.Options names this file).
    shim_options.write_text(f'BinaryName = "runc"\nRoot = "{runc_root}"\n')
    return CriSettings(
        sandbox_image=PAUSE_IMAGE_REF,
        runtimes=(
            CriRuntime(RUNC_HANDLER, "io.containerd.runc.v2", {"Root": runc_root}),
            CriRuntime(KYBERNATE_HANDLER, KYBERNATE_RUNTIME,
                       {"TypeUrl": "containerd.runc.v1.Options",
                        "ConfigPath": str(shim_options)},
                       annotations=("io.kybernate.*",)),
        ),
        cgroup_parent=cgroup_parent,
    )


class CriClient:
    """RuntimeService and ImageService of one containerd, with the messages module."""

    def __init__(self, address: str, api: ModuleType, stubs: ModuleType) -> None:
        import grpc

        self.api = api
        self._channel = grpc.insecure_channel(f"unix://{address}")
        self.runtime = stubs.RuntimeServiceStub(self._channel)
        self.images = stubs.ImageServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def call(self, method: Callable[..., Any], request: Any) -> Any:
        return method(request, timeout=CALL_TIMEOUT_S)


@dataclass
class CriSandbox:
    """A CRI-enabled private containerd, its client, and what the tests' pods share."""

    containerd: Containerd
    client: CriClient
    log_dir: Path

    @property
    def api(self) -> ModuleType:
        return self.client.api

    def pod_config(self, name: str, annotations: dict[str, str] | None = None, *,
                   own_network: bool = False) -> Any:
        """A host-network pod (no CNI needed), without a hostname (which a host-network
        pod must not set), under the instance's cgroup parent; with `own_network`, a pod
        with its own network namespace (CNI: see `enable_pod_network`) and a hostname."""
        api = self.api
        assert self.containerd.cri is not None
        uid = uuid.uuid4().hex
        return api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=name, uid=uid, namespace=POD_NAMESPACE),
            hostname=name if own_network else "",
            log_directory=str(self.log_dir / uid),
            annotations=annotations or {},
            linux=api.LinuxPodSandboxConfig(
                cgroup_parent=self.containerd.cri.cgroup_parent,
                security_context=api.LinuxSandboxSecurityContext(
                    namespace_options=api.NamespaceOption(
                        network=api.POD if own_network else api.NODE, pid=api.CONTAINER,
                        ipc=api.POD)),
            ),
        )

    def container_config(self, name: str, command: list[str],
                         image: str = BUSYBOX_IMAGE_REF, pod: Any = None) -> Any:
        """A container config; with the pod's config, labelled as kubelet labels it
        (pod namespace, pod name, container name)."""
        api = self.api
        labels = {} if pod is None else {
            "io.kubernetes.pod.namespace": pod.metadata.namespace,
            "io.kubernetes.pod.name": pod.metadata.name,
            "io.kubernetes.pod.uid": pod.metadata.uid,
            "io.kubernetes.container.name": name,
        }
        return api.ContainerConfig(
            metadata=api.ContainerMetadata(name=name),
            image=api.ImageSpec(image=image),
            command=command,
            labels=labels,
            log_path=f"{name}.log",
            linux=api.LinuxContainerConfig(),
        )

    def run_pod(self, name: str, handler: str, **config: Any) -> tuple[str, Any]:
        """RunPodSandbox of `pod_config(name, **config)`; (sandbox id, the pod's config)."""
        pod = self.pod_config(name, **config)
        response = self.client.call(self.client.runtime.RunPodSandbox,
                                    self.api.RunPodSandboxRequest(config=pod,
                                                                  runtime_handler=handler))
        return response.pod_sandbox_id, pod

    def start_container(self, sandbox_id: str, pod: Any, name: str, command: list[str]) -> str:
        """CreateContainer then StartContainer; the container's id."""
        api, client = self.api, self.client
        created = client.call(client.runtime.CreateContainer, api.CreateContainerRequest(
            pod_sandbox_id=sandbox_id, config=self.container_config(name, command, pod=pod),
            sandbox_config=pod))
        client.call(client.runtime.StartContainer,
                    api.StartContainerRequest(container_id=created.container_id))
        return created.container_id

    def remove_pod(self, sandbox_id: str) -> None:
        """Stop and remove the pod and whatever containers it still has."""
        api, client = self.api, self.client
        containers = client.call(client.runtime.ListContainers, api.ListContainersRequest(
            filter=api.ContainerFilter(pod_sandbox_id=sandbox_id))).containers
        for container in containers:
            client.call(client.runtime.StopContainer,
                        api.StopContainerRequest(container_id=container.id, timeout=10))
            client.call(client.runtime.RemoveContainer,
                        api.RemoveContainerRequest(container_id=container.id))
        client.call(client.runtime.StopPodSandbox,
                    api.StopPodSandboxRequest(pod_sandbox_id=sandbox_id))
        client.call(client.runtime.RemovePodSandbox,
                    api.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id))

    def pods(self) -> list[Any]:
        return list(self.client.call(self.client.runtime.ListPodSandbox,
                                     self.api.ListPodSandboxRequest()).items)

    @contextlib.contextmanager
    def pods_removed_after(self) -> Iterator[list[str]]:
        """A list for the sandbox ids a test runs; whatever is left of them is removed
        afterwards."""
        ran: list[str] = []
        try:
            yield ran
        finally:
            existing = {pod.id for pod in self.pods()}
            for sandbox_id in ran:
                if sandbox_id in existing:
                    self.remove_pod(sandbox_id)

    def leftovers(self, settle_s: float = 15.0) -> list[str]:
        """What the pods of this instance left behind, each as a readable line: pods,
        shims, runc containers, mounts, cgroups under the pods' parent. A shim exits
        shortly after containerd's Shutdown call returns: what goes away within
        `settle_s` is not left behind."""
        deadline = time.monotonic() + settle_s
        found = self._leftovers_now()
        while found and time.monotonic() < deadline:
            time.sleep(0.1)
            found = self._leftovers_now()
        return found

    def _leftovers_now(self) -> list[str]:
        ctd = self.containerd
        assert ctd.cri is not None
        found = [f"pod {pod.id}" for pod in self.pods()]
        found += [f"shim pid {pid}" for pid in ctd.shim_pids()]
        runc_root = ctd.runc_root()
        if runc_root.is_dir():
            found += [f"runc container {entry.name}" for entry in runc_root.iterdir()]
        found += [f"mount {m}" for m in ctd.mounts_under(ctd.state, ctd.root)]
        found += [f"cgroup {c}" for c in pod_cgroups(ctd.cri.cgroup_parent)]
        return found


#: Debian's CNI plugins, unpacked by .ci/install-system.sh (never installed).
CNI_PLUGINS_DIR = Path("/opt/kybernate/cni/usr/lib/cni")
#: What a pod network of bridge + host-local needs; CRI runs loopback itself.
CNI_PLUGINS = ("bridge", "host-local", "loopback")


@dataclass(frozen=True)
class PodNetwork:
    """A private pod network of one CRI containerd: its own bridge and subnet."""

    bridge: str
    subnet: str

    def remove(self) -> None:
        """The bridge outlives the pods (CNI DEL removes only their veths)."""
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30, check=False)


def enable_pod_network(sandbox: CriSandbox) -> PodNetwork:
    """Give the instance's pods their own network namespaces: Debian's bridge and
    host-local CNI plugins (linked into its private CNI bin dir), a bridge and a /24 of
    its own, no gateway and no masquerading (nothing on the host changes but the
    bridge, which `PodNetwork.remove` deletes). Waits until CRI reports the network."""
    ctd = sandbox.containerd
    for plugin in CNI_PLUGINS:
        source = CNI_PLUGINS_DIR / plugin
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing: run .ci/install-system.sh")
        (ctd.cni_bin_dir / plugin).symlink_to(source)
    tag = uuid.uuid4().hex[:8]
    network = PodNetwork(bridge=f"kyb{tag}", subnet=f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}.0/24")
    conflist = {
        "cniVersion": "1.0.0", "name": f"kyb-{tag}",
        "plugins": [{"type": "bridge", "bridge": network.bridge, "isGateway": False, "ipMasq": False,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": network.subnet}]],
                              "dataDir": str(ctd.base / "cni" / "ipam")}}],
    }
    (ctd.cni_conf_dir / "10-kybernate-test.conflist").write_text(json.dumps(conflist))
    api, client = sandbox.api, sandbox.client
    deadline = time.monotonic() + 30
    while True:
        conditions = {c.type: c.status for c in client.call(client.runtime.Status,
                                                             api.StatusRequest()).status.conditions}
        if conditions.get("NetworkReady"):
            return network
        if time.monotonic() > deadline:
            network.remove()
            raise AssertionError(f"CRI network not ready with {conflist}: {conditions}")
        time.sleep(0.2)


def pull_through_registry(sandbox: CriSandbox, registry_host: str,
                          image: str = BUSYBOX_IMAGE_REF) -> str:
    """Push `image` to the registry at `registry_host` and pull it back through CRI, so
    that it has a repository digest (CRI's restore from an archive pulls the
    checkpoint's base image by it); the reference pulled."""
    reference = f"{registry_host}/{image.split('/', 1)[1]}"
    sandbox.containerd.ctr("images", "tag", image, reference, check=True)
    sandbox.containerd.ctr("images", "push", "--plain-http", reference, timeout=120, check=True)
    sandbox.containerd.ctr("images", "rm", reference, check=True)
    sandbox.client.call(sandbox.client.images.PullImage,
                        sandbox.api.PullImageRequest(image=sandbox.api.ImageSpec(image=reference)))
    return reference


def pod_cgroups(cgroup_parent: str) -> list[Path]:
    """Cgroups below the pods' parent, in every mounted hierarchy."""
    return [child for parent in cgroups_named(cgroup_parent)
            for child in parent.iterdir() if child.is_dir()]


def network_namespaces() -> set[str]:
    """Named network namespaces (CRI's `cni-...` ones live here)."""
    with contextlib.suppress(FileNotFoundError):
        return set(os.listdir("/var/run/netns"))
    return set()


@contextlib.contextmanager
def cri_sandbox(release: ContainerdRelease | None, busybox_archive: Path) -> Iterator[CriSandbox]:
    """A started CRI containerd with the pause and busybox images, and a client;
    everything removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix=f"kyb-cri-{os.getpid()}-", dir="/tmp"))
    cgroup_parent = f"/kyb-cri-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    ctd = Containerd(base=base, release=release, cri=cri_settings(base, cgroup_parent))
    sandbox: CriSandbox | None = None
    try:
        api, stubs = load_cri_api(base / "cri-api")
        pause_archive = build_pause_archive(base / "pause-oci.tar")
        ctd.start()
        import_image(ctd, pause_archive, PAUSE_IMAGE_REF)
        import_image(ctd, busybox_archive, BUSYBOX_IMAGE_REF)
        log_dir = base / "pod-logs"
        log_dir.mkdir()
        sandbox = CriSandbox(ctd, CriClient(ctd.address, api, stubs), log_dir)
        wait_cri_ready(sandbox)
        yield sandbox
    finally:
        if sandbox is not None:
            # Through CRI first, so that CRI's own state goes too; stop() forces the rest.
            with contextlib.suppress(Exception):
                for pod in sandbox.pods():
                    sandbox.remove_pod(pod.id)
            sandbox.client.close()
        ctd.stop()


def wait_cri_ready(sandbox: CriSandbox, timeout: float = 30.0) -> None:
    """Until CRI reports the runtime ready (its network stays not ready: no CNI)."""
    api, client = sandbox.api, sandbox.client
    deadline = time.monotonic() + timeout
    conditions: dict[str, bool] = {}
    while time.monotonic() < deadline:
        status = client.call(client.runtime.Status, api.StatusRequest())
        conditions = {c.type: c.status for c in status.status.conditions}
        if conditions.get("RuntimeReady"):
            return
        time.sleep(0.2)
    raise AssertionError(f"CRI runtime not ready after {timeout}s: {conditions}\n"
                         f"{sandbox.containerd.log_tail()}")


def exec_sync(sandbox: CriSandbox, container_id: str, command: list[str]) -> Any:
    """ExecSync, as `crictl exec -s` does."""
    return sandbox.client.call(sandbox.client.runtime.ExecSync, sandbox.api.ExecSyncRequest(
        container_id=container_id, cmd=command, timeout=30))


__all__ = [
    "KYBERNATE_HANDLER",
    "RUNC_HANDLER",
    "CriClient",
    "CriSandbox",
    "cri_sandbox",
    "cri_settings",
    "exec_sync",
    "load_cri_api",
    "network_namespaces",
    "pod_cgroups",
]

