"""The `kybernate` command (filled in by the agent and demo work)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("kybernate: no commands yet", file=sys.stderr)
    return 2
