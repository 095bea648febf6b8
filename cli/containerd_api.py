"""A small client of containerd's own gRPC API (its socket, a namespace per call):
finding a pod's container by the labels kubelet gives it, and checkpointing its task,
which containerd forwards to the container's shim.

Works the same on containerd 1.7 and 2.x: both serve containerd.services.containers.v1
and containerd.services.tasks.v1 unchanged (the wire test compares our messages with
both).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Self

from kybernate.errors import InvalidArgument, NotFound, StatusCode, Unavailable, error_from_status

if TYPE_CHECKING:
    from kybernate.protos import containerd_containers_pb2

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
#: The containerd namespace of containerd's CRI plugin (Kubernetes' containers).
CRI_NAMESPACE = "k8s.io"
#: Labels kubelet puts on every container it creates through CRI.
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
POD_NAME_LABEL = "io.kubernetes.pod.name"
CONTAINER_NAME_LABEL = "io.kubernetes.container.name"
#: CRI's label telling a pod's containers from its sandbox.
CRI_KIND_LABEL = "io.cri-containerd.kind"
# Kubernetes names (DNS-1123 labels and subdomains): safe inside containerd's filters.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
#: containerd forwards a checkpoint to the shim and waits for the whole dump.
CHECKPOINT_TIMEOUT_S = 3600.0


def pod_container_filter(pod_namespace: str, pod: str, container: str) -> str:
    """containerd's filter for a pod's container by kubelet's labels; the names are
    checked as Kubernetes checks them, so none can change the filter's meaning."""
    for what, value, pattern in (("pod namespace", pod_namespace, _DNS_LABEL),
                                 ("pod name", pod, _DNS_SUBDOMAIN),
                                 ("container name", container, _DNS_LABEL)):
        if not pattern.match(value):
            raise InvalidArgument(f"{what} {value[:80]!r} is not a Kubernetes name")
    return (f'labels."{POD_NAMESPACE_LABEL}"=={pod_namespace},labels."{POD_NAME_LABEL}"=={pod},'
            f'labels."{CONTAINER_NAME_LABEL}"=={container},labels."{CRI_KIND_LABEL}"==container')


class ContainerdClient:
    """One gRPC channel to containerd, every call in one namespace."""

    def __init__(self, address: str = DEFAULT_ADDRESS, namespace: str = CRI_NAMESPACE) -> None:
        self.address = address
        self.namespace = namespace
        self._channel: Any = None

    async def __aenter__(self) -> Self:
        import grpc

        self._channel = grpc.aio.insecure_channel(f"unix:{self.address}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("containerd-namespace", self.namespace),)

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        import grpc

        try:
            return await method(request, metadata=self._metadata(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            number = code.value[0] if code is not None else StatusCode.UNKNOWN
            if number == StatusCode.UNAVAILABLE:
                raise Unavailable(f"containerd at {self.address}: {exc.details() or 'unavailable'}") from None
            raise error_from_status(number, f"containerd: {exc.details()}") from None

    async def container(self, container_id: str) -> containerd_containers_pb2.Container:
        from kybernate.protos import containerd_containers_pb2, containerd_containers_pb2_grpc

        stub = containerd_containers_pb2_grpc.ContainersStub(self._channel)
        response: containerd_containers_pb2.GetContainerResponse = await self._call(
            stub.Get, containerd_containers_pb2.GetContainerRequest(id=container_id), timeout=30)
        return response.container

    async def pod_container(self, pod_namespace: str, pod: str,
                            container: str) -> containerd_containers_pb2.Container:
        """The newest container of that name in that pod (kubelet keeps exited ones of
        earlier restarts for a while)."""
        from kybernate.protos import containerd_containers_pb2, containerd_containers_pb2_grpc

        stub = containerd_containers_pb2_grpc.ContainersStub(self._channel)
        response: containerd_containers_pb2.ListContainersResponse = await self._call(
            stub.List, containerd_containers_pb2.ListContainersRequest(
                filters=[pod_container_filter(pod_namespace, pod, container)]), timeout=30)
        if not response.containers:
            raise NotFound(f"containerd namespace {self.namespace!r} has no container {container!r} of pod "
                           f"{pod_namespace}/{pod}")
        return max(response.containers, key=lambda c: (c.created_at.seconds, c.created_at.nanos))

    async def checkpoint_task(self, container_id: str) -> None:
        """containerd's task Checkpoint, without options: the shim decides (from the
        container's annotations and its agent's defaults)."""
        from kybernate.protos import containerd_tasks_pb2, containerd_tasks_pb2_grpc

        stub = containerd_tasks_pb2_grpc.TasksStub(self._channel)
        await self._call(stub.Checkpoint, containerd_tasks_pb2.CheckpointTaskRequest(container_id=container_id),
                         timeout=CHECKPOINT_TIMEOUT_S)
