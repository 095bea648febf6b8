"""Real runc, driven by the unit tests without containerd: a private runc root and the
bundles, container ids and cgroups one test makes, all removed afterwards; and the
event loop with a started child-subreaper Reaper those tests run in."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

from kybernate.runtime.reaper import Reaper
from kybernate.runtime.runc import Runc

from tests.support.bundle import make_bundle

T = TypeVar("T")
CGROUP_ROOT = Path("/sys/fs/cgroup")


class RuncSandbox:
    """A private runc root under `dir`, and what a test made there."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.dir = Path(tempfile.mkdtemp(prefix=f"kyb-{prefix}-{os.getpid()}-"))
        #: runc's --root.
        self.root = self.dir / "runc-root"
        #: Where runc keeps the containers' state: the root, or below it (runc's shim
        #: adds the namespace).
        self.state_root = self.root
        self.ids: list[str] = []
        self.cgroups: list[str] = []

    def new_id(self) -> str:
        container_id = f"kyb-{self.prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.ids.append(container_id)
        return container_id

    def new_cgroup(self) -> str:
        path = f"/kyb-{self.prefix}-cg-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.cgroups.append(path)
        return path

    def bundle(self, container_id: str, args: list[str], *, cgroups_path: str | None = None,
               terminal: bool = False) -> Path:
        """A busybox bundle for `args` in a cgroup of its own (removed afterwards)."""
        return make_bundle(self.dir / container_id, args, terminal=terminal,
                           cgroups_path=cgroups_path or self.new_cgroup())

    def new_bundle(self, args: list[str], *, terminal: bool = False) -> tuple[str, Path]:
        """A new container id and its bundle."""
        container_id = self.new_id()
        return container_id, self.bundle(container_id, args, terminal=terminal)

    def runc(self, reaper: Reaper, log_dir: Path | None = None) -> Runc:
        return Runc(reaper, root=str(self.root), log_dir=str(log_dir or self.dir))

    def cleanup(self) -> None:
        for container_id in self.ids:
            delete_runc_container(self.state_root, container_id)
        for cgroup in self.cgroups:
            remove_cgroup(cgroup)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def runc_sandbox(prefix: str) -> Iterator[RuncSandbox]:
    sandbox = RuncSandbox(prefix)
    try:
        yield sandbox
    finally:
        sandbox.cleanup()


def delete_runc_container(root: Path, container_id: str) -> None:
    """`runc delete --force`, whatever state the container is in (or none)."""
    subprocess.run(["runc", "--root", str(root), "delete", "--force", container_id],
                   capture_output=True, check=False)


def remove_cgroup(path: str) -> None:
    """Remove the (empty) cgroup at `path` in every hierarchy that has it."""
    for hierarchy in CGROUP_ROOT.iterdir():
        directory = hierarchy / path.lstrip("/")
        if directory.is_dir():
            with contextlib.suppress(OSError):
                directory.rmdir()


def with_reaper(body: Callable[[Reaper], Awaitable[T]], timeout: float = 60.0,
                exit_history: int | None = None) -> T:
    """Run `body` on a fresh loop with a started child-subreaper Reaper, stopped after."""
    async def main() -> T:
        reaper = Reaper() if exit_history is None else Reaper(exit_history=exit_history)
        reaper.start()
        try:
            async with asyncio.timeout(timeout):
                return await body(reaper)
        finally:
            reaper.stop()

    return asyncio.run(main())
