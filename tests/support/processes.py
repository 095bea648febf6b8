"""Finding a container's processes from the host by the fake CUDA marker in their environment."""

from __future__ import annotations

from pathlib import Path

import psutil
from kybernate.cuda.fake import ENV_TOKEN

GONE = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


def live_pids_with_marker(token: str) -> list[int]:
    """Live (not zombie) processes whose environment makes them the fake's CUDA process `token`."""
    needle = f"{ENV_TOKEN}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (needle in (entry / "environ").read_bytes().split(b"\0")
                    and psutil.Process(int(entry.name)).status() not in GONE):
                found.append(int(entry.name))
        except (OSError, psutil.Error):
            continue
    return found
