"""The `kybernate` command: the node agent, the checkpoint registry, and the demo.

`kybernate = "kybernate.cli:main"` in pyproject; `python -m kybernate` runs it too.

Each subcommand imports its implementation only when chosen, so `kybernate --help`
stays fast and the agent's heavy dependencies (grpc, boto3) load only for the agent.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

USAGE = """kybernate COMMAND [ARGS]

commands:
  agent [--config FILE] [...]      run the node agent (gRPC on a unix socket)
  checkpoint create --name N POD_NAMESPACE/POD/CONTAINER|ID
                                   checkpoint a pod's container through containerd
                                   into the agent's registry (a golden snapshot)
  checkpoint list [...]            list the checkpoints the agent holds
  checkpoint inspect ID [...]      show one checkpoint's metadata
  checkpoint share ID --with NS    let another namespace restore it (--revoke: no more)
  checkpoint rm ID... [--remote]   remove checkpoints (local files, record, remote copy)
  checkpoint gc [--dry-run]        apply the agent's retention policy now
  checkpoint promote ID            upload to the remote tier now
  checkpoint fetch ID [-n NS]      download from the remote tier ahead of a restore
  checkpoint verify ID             check every file against its metadata
  checkpoint export ID REF         push as an OCI checkpoint image (registry/repo:tag)
  checkpoint import REF [-n NS]    pull a checkpoint image, verify and record it
  doctor [--json]                  check this node: kernel, CRIU, runc, containerd,
                                   the runtime entry, the agent and its tiers, GPUs
  demo [--keep]                    run a container through Kybernate on a private
                                   containerd: run, exec, checkpoint, restore, clean up
"""


def _agent(argv: list[str]) -> int:
    from kybernate.agent.main import agent_main

    return agent_main(argv)


def _checkpoint(argv: list[str]) -> int:
    from kybernate.cli import lifecycle as lifecycle_cli
    from kybernate.cli.checkpoint import (
        checkpoint_create_main,
        checkpoint_inspect_main,
        checkpoint_list_main,
        checkpoint_share_main,
    )

    commands: dict[str, Callable[[list[str]], int]] = {
        "create": checkpoint_create_main,
        "list": checkpoint_list_main,
        "ls": checkpoint_list_main,
        "inspect": checkpoint_inspect_main,
        "share": checkpoint_share_main,
        "rm": lifecycle_cli.checkpoint_rm_main,
        "gc": lifecycle_cli.checkpoint_gc_main,
        "promote": lifecycle_cli.checkpoint_promote_main,
        "fetch": lifecycle_cli.checkpoint_fetch_main,
        "verify": lifecycle_cli.checkpoint_verify_main,
        "export": lifecycle_cli.checkpoint_export_main,
        "import": lifecycle_cli.checkpoint_import_main,
    }
    if not argv or argv[0] not in commands:
        print(f"usage: kybernate checkpoint {{{'|'.join(sorted(commands))}}} ... [--socket PATH]", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


def _doctor(argv: list[str]) -> int:
    from kybernate.cli.doctor import doctor_main

    return doctor_main(argv)


def _demo(argv: list[str]) -> int:
    from kybernate.cli.demo import demo_main

    return demo_main(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "agent": _agent,
    "checkpoint": _checkpoint,
    "demo": _demo,
    "doctor": _doctor,
}

#: The top-level modules of the `agent` extra (pyproject.toml).
AGENT_EXTRA_MODULES = frozenset({"grpc", "boto3", "botocore", "prometheus_client"})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if args else 2
    if args[0] == "--version":
        from kybernate import __version__

        print(f"kybernate {__version__}")
        return 0
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"kybernate: unknown command {args[0]!r}\n\n{USAGE}", file=sys.stderr, end="")
        return 2
    try:
        return command(args[1:])
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in AGENT_EXTRA_MODULES:
            raise
        print(f"kybernate {args[0]}: needs the agent's packages ({exc.name} is missing): install them with\n"
              "  pip install 'kybernate[agent]'", file=sys.stderr)
        return 3

