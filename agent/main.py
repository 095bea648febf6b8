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
    from kybernate.agent import logs

    logs.configure(config.log_format, config.log_level)
    from kybernate.agent.daemon import serve

    try:
        asyncio.run(serve(config))
    except KybernateError as exc:
        logging.getLogger("kybernate.agent").error("agent failed: %s", exc)
        return 1
    return 0
