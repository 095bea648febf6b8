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
  checkpoint list [...]            list the checkpoints the agent holds
  checkpoint inspect ID [...]      show one checkpoint's metadata
  checkpoint share ID --with NS    let another namespace restore it (--revoke: no more)
  demo [--keep]                    run a container through Kybernate on a private
                                   containerd: run, exec, checkpoint, restore, clean up
"""


def _agent(argv: list[str]) -> int:
    from kybernate.agent.main import agent_main

    return agent_main(argv)


def _checkpoint(argv: list[str]) -> int:
    from kybernate.cli.checkpoint import (
        checkpoint_inspect_main,
        checkpoint_list_main,
        checkpoint_share_main,
    )

    commands: dict[str, Callable[[list[str]], int]] = {
        "list": checkpoint_list_main,
        "ls": checkpoint_list_main,
        "inspect": checkpoint_inspect_main,
        "share": checkpoint_share_main,
    }
    if not argv or argv[0] not in commands:
        print("usage: kybernate checkpoint {list|inspect ID|share ID --with NS} [--socket PATH]", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


def _demo(argv: list[str]) -> int:
    from kybernate.cli.demo import demo_main

    return demo_main(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "agent": _agent,
    "checkpoint": _checkpoint,
    "demo": _demo,
}


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
    return command(args[1:])

