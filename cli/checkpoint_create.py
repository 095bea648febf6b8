"""`kybernate checkpoint create`: a golden snapshot of a pod's container, on any containerd.

    kybernate checkpoint create --name golden-llm serving/llm-server-0/server
    kybernate checkpoint create --name golden-llm 7f3c...e1    # a containerd container id

The container is named by pod namespace, pod and container (as kubelet labels it) or
by its containerd id. The checkpoint goes through containerd's task API, as kubelet's
checkpoint API and `ctr` do, so it reaches the container's shim, which runs the node
agent's pipeline under its kill policy; containerd 1.7, whose CRI has no checkpoint
call, is served the same way as 2.x. The agent is told first to claim the container's
next checkpoint under the given name (`ReserveCheckpoint`): that checkpoint stays in
its registry, ready for pods to restore with `io.kybernate.restore-from`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kybernate.api.client import DEFAULT_SOCKET, AgentClient
from kybernate.cli.containerd_api import CRI_NAMESPACE, DEFAULT_ADDRESS, ContainerdClient
from kybernate.errors import DeadlineExceeded, InvalidArgument, KybernateError

if TYPE_CHECKING:
    from kybernate.protos.agent_pb2 import CheckpointRecord

#: How long the local commit (fsync and seal, after the task runs again) may take.
COMMIT_WAIT_S = 600.0
COMMIT_POLL_S = 0.05


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kybernate checkpoint create",
        description="Checkpoint a pod's container through containerd into the agent's registry")
    parser.add_argument("target", metavar="POD_NAMESPACE/POD/CONTAINER | CONTAINER_ID",
                        help="the pod's container, or a containerd container id")
    parser.add_argument("--name", required=True, help="the checkpoint's name (unique in the namespace)")
    parser.add_argument("-n", "--namespace", default=CRI_NAMESPACE,
                        help=f"containerd namespace (default {CRI_NAMESPACE}, CRI's)")
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="containerd's socket")
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="the agent's socket")
    parser.add_argument("--share", metavar="NAMESPACE[/POD_NAMESPACE]", action="append", default=[],
                        help="let this namespace restore it too (repeatable)")
    parser.add_argument("--json", action="store_true", help="print the checkpoint's record as JSON")
    return parser.parse_args(list(argv))


async def committed_record(agent: AgentClient, reference: str) -> CheckpointRecord:
    """The checkpoint's record once committed: the shim returns at EXPORTED, before
    the agent's commit (fsync, seal) that follows once the container runs again."""
    from kybernate.protos import agent_pb2

    deadline = time.monotonic() + COMMIT_WAIT_S
    while True:
        record = (await agent.inspect_checkpoint(agent_pb2.InspectCheckpointRequest(checkpoint=reference))).record
        if record.state != "staging":
            break
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"{reference}: not committed after {COMMIT_WAIT_S:.0f}s")
        await asyncio.sleep(COMMIT_POLL_S)
    if record.state != "committed":
        raise KybernateError(f"{reference}: the checkpoint's commit failed (state {record.state})")
    return record


async def create(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict
    from kybernate.protos import agent_pb2

    parts = args.target.split("/")
    async with ContainerdClient(args.address, args.namespace) as containerd, AgentClient(args.socket) as agent:
        if len(parts) == 3:
            container = await containerd.pod_container(*parts)
        elif len(parts) == 1:
            container = await containerd.container(parts[0])
        else:
            raise InvalidArgument(f"{args.target!r}: name POD_NAMESPACE/POD/CONTAINER or a container id")
        await agent.reserve_checkpoint(agent_pb2.ReserveCheckpointRequest(
            namespace=args.namespace, container_id=container.id, name=args.name))
        try:
            await containerd.checkpoint_task(container.id)
        except BaseException:
            await agent.reserve_checkpoint(agent_pb2.ReserveCheckpointRequest(
                namespace=args.namespace, container_id=container.id, name=args.name, release=True))
            raise
        reference = f"{args.namespace}/{args.name}"
        for grantee in args.share:
            namespace, _, pod_namespace = grantee.partition("/")
            await agent.share_checkpoint(agent_pb2.ShareCheckpointRequest(
                checkpoint=reference, namespace=namespace, pod_namespace=pod_namespace))
        record = await committed_record(agent, reference)
    if record.container_id != container.id:
        raise KybernateError(f"{reference} is not a checkpoint of {container.id} (another client named one so?)")
    if args.json:
        print(json.dumps(MessageToDict(record, preserving_proto_field_name=True), sort_keys=True))
    else:
        print(f"{reference} ({record.id}): container {container.id}, {record.size_bytes} bytes, {record.state}")
    return 0
