"""`kybernate checkpoint rm|gc|promote|fetch|export|import|verify`: the checkpoint
lifecycle through the node agent. Long operations draw their progress on stderr when
it is a terminal."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

from kybernate.api.client import AgentClient
from kybernate.cli.checkpoint import _client_parser, _namespace_argument, _reference, _run_client
from kybernate.cli.terminal import ProgressLine, human_bytes


def _record_dict(record: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(record, preserving_proto_field_name=True)


def _json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def checkpoint_rm_main(argv: Sequence[str]) -> int:
    parser = _client_parser("kybernate checkpoint rm", "Remove checkpoints: local files and registry row")
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="id, name, or namespace/name")
    _namespace_argument(parser)
    parser.add_argument("--remote", action="store_true", help="also remove the copy in the remote tier")
    args = parser.parse_args(list(argv))

    async def run() -> int:
        from kybernate.protos import agent_pb2

        async with AgentClient(args.socket) as client:
            for checkpoint in args.checkpoints:
                response = await client.delete_checkpoint(agent_pb2.DeleteCheckpointRequest(
                    checkpoint=_reference(checkpoint, args.namespace), remote=args.remote))
                record = response.record
                what = [w for w, done in (("local copy", response.removed_local),
                                          ("remote copy", response.removed_remote)) if done]
                print(f"removed {record.namespace}/{record.name} ({record.id}): {', '.join(what) or 'record'}")
        return 0

    return _run_client(run)


def checkpoint_gc_main(argv: Sequence[str]) -> int:
    parser = _client_parser("kybernate checkpoint gc",
                            "Apply the retention policy of the agent's configuration now")
    parser.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    _json_argument(parser)
    args = parser.parse_args(list(argv))

    async def run() -> int:
        from kybernate.protos import agent_pb2

        async with AgentClient(args.socket) as client:
            response = await client.collect_garbage(agent_pb2.CollectGarbageRequest(dry_run=args.dry_run))
        if args.json:
            print(json.dumps(_record_dict(response), sort_keys=True))
            return 0
        verb = "would remove" if args.dry_run else "removed"
        for item in response.collected:
            r = item.record
            print(f"{verb} {r.namespace}/{r.name} ({r.id}), {item.scope}: {item.reason}")
        for kept in response.kept:
            print(f"kept {kept}")
        if not args.dry_run:
            print(f"freed {human_bytes(response.freed_local_bytes)} local,"
                  f" {human_bytes(response.freed_remote_bytes)} remote")
        return 0

    return _run_client(run)


async def _transfer(client: AgentClient, method: str, request: Any, what: str) -> Any:
    """Run a long operation, drawing its progress; the last message."""
    line = ProgressLine(what)
    last = None
    try:
        async for message in client.transfer(method, request):
            last = message
            if message.step != "done":
                line.update(message.step, message.done_bytes, message.total_bytes)
    finally:
        line.finish()
    return last


def _print_record(last: Any, verb: str, as_json: bool) -> None:
    record = last.record
    if as_json:
        document = _record_dict(record)
        if last.digest:
            document["digest"] = last.digest
        print(json.dumps(document, sort_keys=True))
    else:
        print(f"{verb} {record.namespace}/{record.name} ({record.id}, {human_bytes(record.size_bytes)})"
              + (f" {last.digest}" if last.digest else ""))


def _one_checkpoint_main(argv: Sequence[str], prog: str, description: str, method: str,
                         verbs: tuple[str, str], request: Callable[[str], Any]) -> int:
    """A long operation on one checkpoint named by id, name or namespace/name."""
    parser = _client_parser(prog, description)
    parser.add_argument("checkpoint", help="id, name, or namespace/name")
    _namespace_argument(parser)
    _json_argument(parser)
    args = parser.parse_args(list(argv))

    async def run() -> int:
        reference = _reference(args.checkpoint, args.namespace)
        async with AgentClient(args.socket) as client:
            last = await _transfer(client, method, request(reference), f"{verbs[0]} {reference}")
        _print_record(last, verbs[1], args.json)
        return 0

    return _run_client(run)


def checkpoint_promote_main(argv: Sequence[str]) -> int:
    from kybernate.protos import agent_pb2

    return _one_checkpoint_main(argv, "kybernate checkpoint promote", "Upload a checkpoint to the remote tier now",
                                "PromoteCheckpoint", ("upload", "uploaded"),
                                lambda reference: agent_pb2.PromoteCheckpointRequest(checkpoint=reference))


def checkpoint_verify_main(argv: Sequence[str]) -> int:
    from kybernate.protos import agent_pb2

    return _one_checkpoint_main(argv, "kybernate checkpoint verify", "Check every file of a local checkpoint",
                                "VerifyCheckpoint", ("verify", "verified"),
                                lambda reference: agent_pb2.VerifyCheckpointRequest(checkpoint=reference))


def checkpoint_fetch_main(argv: Sequence[str]) -> int:
    parser = _client_parser("kybernate checkpoint fetch",
                            "Bring a remote checkpoint into the local tier ahead of a restore")
    parser.add_argument("checkpoint", help="id, name, or namespace/name")
    _namespace_argument(parser)
    parser.add_argument("--pod-namespace", default="",
                        help="the Kubernetes namespace that will restore it (through CRI)")
    _json_argument(parser)
    args = parser.parse_args(list(argv))

    async def run() -> int:
        from kybernate.protos import agent_pb2

        async with AgentClient(args.socket) as client:
            last = await _transfer(client, "FetchCheckpoint", agent_pb2.FetchCheckpointRequest(
                checkpoint=args.checkpoint, namespace=args.namespace, pod_namespace=args.pod_namespace),
                f"download {args.checkpoint}")
        _print_record(last, "fetched", args.json)
        return 0

    return _run_client(run)


def checkpoint_export_main(argv: Sequence[str]) -> int:
    parser = _client_parser("kybernate checkpoint export",
                            "Push a checkpoint to an OCI registry as a checkpoint image")
    parser.add_argument("checkpoint", help="id, name, or namespace/name")
    parser.add_argument("image", metavar="REF", help="registry/repository:tag")
    _namespace_argument(parser)
    _json_argument(parser)
    args = parser.parse_args(list(argv))

    async def run() -> int:
        from kybernate.protos import agent_pb2

        reference = _reference(args.checkpoint, args.namespace)
        async with AgentClient(args.socket) as client:
            last = await _transfer(client, "ExportCheckpoint", agent_pb2.ExportCheckpointRequest(
                checkpoint=reference, reference=args.image), f"export {reference}")
        _print_record(last, f"exported to {args.image}:", args.json)
        return 0

    return _run_client(run)


def checkpoint_import_main(argv: Sequence[str]) -> int:
    parser = _client_parser("kybernate checkpoint import",
                            "Pull a checkpoint image, verify it, and record it in a namespace")
    parser.add_argument("image", metavar="REF", help="registry/repository:tag or @sha256:digest")
    _namespace_argument(parser)
    parser.add_argument("--pod-namespace", default="", help="the Kubernetes namespace it belongs to")
    parser.add_argument("--name", default="", help="its name in the namespace (default: from the digest)")
    _json_argument(parser)
    args = parser.parse_args(list(argv))

    async def run() -> int:
        from kybernate.protos import agent_pb2

        async with AgentClient(args.socket) as client:
            last = await _transfer(client, "ImportCheckpoint", agent_pb2.ImportCheckpointRequest(
                reference=args.image, namespace=args.namespace, pod_namespace=args.pod_namespace,
                name=args.name), f"import {args.image}")
        _print_record(last, "imported", args.json)
        return 0

    return _run_client(run)
