"""`kybernate checkpoint list|inspect|share`: the agent's registry, through its client."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from kybernate.api.client import DEFAULT_SOCKET, AgentClient
from kybernate.errors import KybernateError

#: ctr's default namespace.
DEFAULT_NAMESPACE = "default"


def _client_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--socket", default=DEFAULT_SOCKET, help="the agent's socket")
    return parser


def _format_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return str(size)


def checkpoint_list_main(argv: Sequence[str]) -> int:
    parser = _client_parser("kybernate checkpoint list", "List the checkpoints of this node's registry")
    parser.add_argument("--state", choices=("staging", "committed", "failed"))
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(list(argv))

    async def run() -> int:
        from google.protobuf.json_format import MessageToDict
        from kybernate.protos import agent_pb2

        async with AgentClient(args.socket) as client:
            response = await client.list_checkpoints(agent_pb2.ListCheckpointsRequest(state=args.state or ""))
        if args.json:
            for record in response.checkpoints:
                print(json.dumps(MessageToDict(record, preserving_proto_field_name=True), sort_keys=True))
            return 0
        print(f"{'ID':<39} {'NAME':<32} {'STATE':<10} {'TIER':<7} {'DIRTY':<6} {'SIZE':>10}  CONTAINER")
        for r in response.checkpoints:
            print(f"{r.id:<39} {r.name:<32} {r.state:<10} {r.tier:<7} {'yes' if r.dirty else 'no':<6}"
                  f" {_format_size(r.size_bytes):>10}  {r.namespace}/{r.container_id}")
        return 0

    return _run_client(run)


def _reference(checkpoint: str, namespace: str) -> str:
    """An id as it is, a bare name qualified with the namespace (`-n`, as ctr's)."""
    from kybernate.agent.naming import is_checkpoint_id

    return checkpoint if is_checkpoint_id(checkpoint) or "/" in checkpoint else f"{namespace}/{checkpoint}"


def _namespace_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--namespace", default=DEFAULT_NAMESPACE,
                        help=f"containerd namespace of a checkpoint named without one (default {DEFAULT_NAMESPACE})")


def checkpoint_inspect_main(argv: Sequence[str]) -> int:
    parser = _client_parser("kybernate checkpoint inspect", "Show a checkpoint's record and metadata")
    parser.add_argument("checkpoint", help="id, name, or namespace/name")
    _namespace_argument(parser)
    args = parser.parse_args(list(argv))

    async def run() -> int:
        from google.protobuf.json_format import MessageToDict
        from kybernate.protos import agent_pb2

        async with AgentClient(args.socket) as client:
            response = await client.inspect_checkpoint(agent_pb2.InspectCheckpointRequest(
                checkpoint=_reference(args.checkpoint, args.namespace)))
        document = {"record": MessageToDict(response.record, preserving_proto_field_name=True),
                    "metadata": json.loads(response.metadata_json) if response.metadata_json else None}
        print(json.dumps(document, indent=2, sort_keys=True))
        return 0

    return _run_client(run)


def checkpoint_share_main(argv: Sequence[str]) -> int:
    parser = _client_parser(
        "kybernate checkpoint share",
        "Let another namespace restore a checkpoint (a golden snapshot for many pods), or take that back")
    parser.add_argument("checkpoint", help="id, name, or namespace/name")
    _namespace_argument(parser)
    parser.add_argument("--with", dest="grantee", required=True, metavar="NAMESPACE[/POD_NAMESPACE]",
                        help="the containerd namespace to share with ('*': every namespace), optionally "
                             "only one Kubernetes namespace in it (k8s.io/team-b)")
    parser.add_argument("--revoke", action="store_true", help="take the share back")
    args = parser.parse_args(list(argv))
    grantee_namespace, _, grantee_pod_namespace = args.grantee.partition("/")

    async def run() -> int:
        from kybernate.protos import agent_pb2

        async with AgentClient(args.socket) as client:
            response = await client.share_checkpoint(agent_pb2.ShareCheckpointRequest(
                checkpoint=_reference(args.checkpoint, args.namespace), namespace=grantee_namespace,
                pod_namespace=grantee_pod_namespace, revoke=args.revoke))
        record = response.record
        shared = ", ".join(record.shared_with) or "nobody else"
        print(f"{record.namespace}/{record.name} ({record.id}) is shared with: {shared}")
        return 0

    return _run_client(run)


def checkpoint_create_main(argv: Sequence[str]) -> int:
    from kybernate.cli.checkpoint_create import create, parse_args

    args = parse_args(argv)
    return _run_client(lambda: create(args))


def _run_client(run: Callable[[], Coroutine[Any, Any, int]]) -> int:
    try:
        return asyncio.run(run())
    except KybernateError as exc:
        print(f"kybernate: {exc}", file=sys.stderr)
        return 1
