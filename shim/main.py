"""Entry point of `containerd-shim-kybernate-v1`.

containerd runs the binary with Go `flag`-style options followed by an action (see
flags.py). `start` and `delete` run once per container each, so this module and what
it imports for them stay tiny: no asyncio, no grpc. The long-lived server is the
`serve` action, which only our own `start` launches (`python -m kybernate.shim ...
serve`), or which the forking template (`... template`, see template.py) forks
ready-made.
"""

from __future__ import annotations

import os
import sys

# `collections.abc` would load `collections` (~3 ms) on every start and delete; type
# checkers treat this name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

from kybernate.shim.flags import SHIM_NAME, UsageError, parse_flags


def _finish(status: int, *, fast: bool) -> int:
    """Flush our output; then, as the process's own entry point (`fast`), end at once.

    containerd waits for `start` and `delete` to exit on the path of every `ctr run`,
    and the interpreter's teardown (freeing every module) costs 20-35 ms of CPU there
    while releasing nothing the kernel does not. With the output flushed and no files
    open for writing, skipping it changes nothing else."""
    sys.stdout.flush()
    sys.stderr.flush()
    if fast:
        os._exit(status)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    try:
        flags = parse_flags(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        print(f"{SHIM_NAME}: {err}", file=sys.stderr)
        return 2
    if flags.version:
        from kybernate import __version__

        print(f"{SHIM_NAME}:\n  Version:  {__version__}\n  Python:   {sys.version.split()[0]}")
        return 0
    if not flags.namespace:
        print(f"{SHIM_NAME}: shim namespace cannot be empty", file=sys.stderr)
        return 1
    stdin: bytes | None = None
    if argv is None and flags.action in ("start", "delete"):
        # As containerd's command: hand it to the template, which has everything
        # loaded; run it here only when no template answers (relay.py).
        from kybernate.shim.relay import read_stdin, relay

        stdin = read_stdin() if flags.action == "start" else b""
        relayed = relay(flags.action, sys.argv[1:], flags.address, sys.executable, stdin)
        if relayed is not None:
            status, out, warnings = relayed
            sys.stdout.buffer.write(out)
            sys.stderr.buffer.write(warnings)
            return _finish(status, fast=True)
    try:
        if flags.action == "start":
            from kybernate.shim.start import start

            print(start(flags, options_bytes=stdin), end="")
            return _finish(0, fast=argv is None)
        if flags.action == "delete":
            from kybernate.shim.delete import delete

            sys.stdout.buffer.write(delete(flags))
            return _finish(0, fast=argv is None)
        if flags.action == "serve":
            from kybernate.shim.server import run_server

            return run_server(flags)
        if flags.action == "template":
            from kybernate.shim.template import run_template

            return run_template(flags)
    except Exception as err:  # noqa: BLE001 - containerd shows our stderr as the failure
        print(f"{SHIM_NAME}: {flags.action}: {err}", file=sys.stderr)
        return 1
    print(f'{SHIM_NAME}: unknown action "{flags.action}" (want start or delete)', file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
