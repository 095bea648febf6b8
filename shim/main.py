"""Entry point of containerd-shim-kybernate-v1 (filled in by the shim work)."""

from __future__ import annotations

import sys


def main() -> int:
    print("containerd-shim-kybernate-v1: not built yet", file=sys.stderr)
    return 2
