"""`kybernate agent` and `python -m kybernate.agent`: the node agent in the foreground."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from kybernate.agent.config import config_from_args
from kybernate.errors import KybernateError


def agent_main(argv: Sequence[str]) -> int:
    """Run the node agent in the foreground (systemd runs it so)."""
    try:
        config = config_from_args(argv)
    except KybernateError as exc:
        print(f"kybernate agent: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kybernate.agent.daemon import serve

    try:
        asyncio.run(serve(config))
    except KybernateError as exc:
        logging.getLogger("kybernate.agent").error("agent failed: %s", exc)
        return 1
    return 0
