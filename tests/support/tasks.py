"""A test module's private containerd, and what tests ask of its tasks through `ctr`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from tests.support.cgroups import freezer_state
from tests.support.containerd import Containerd
from tests.support.images import import_image

ContainerdT = TypeVar("ContainerdT", bound=Containerd)


@contextmanager
def private_containerd(instance: ContainerdT, busybox_archive: Path) -> Iterator[ContainerdT]:
    """`instance` started, with the busybox image imported; stopped on exit, even when
    starting or importing failed."""
    try:
        instance.start()
        import_image(instance, busybox_archive)
        yield instance
    finally:
        instance.stop()


def task_pid(ctd: Containerd, container_id: str) -> int:
    """The init pid `ctr task ls` gives for `container_id`."""
    for line in ctd.ctr("task", "ls", check=True).stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == container_id:
            return int(fields[1])
    raise AssertionError(f"no task {container_id}")


def remove_container(ctd: Containerd, container_id: str) -> None:
    """Kill and delete the task if there is one, then remove the container (best effort)."""
    if not ctd.running:
        return
    if ctd.task_status(container_id) is not None:
        ctd.ctr("task", "kill", "-s", "SIGKILL", "--all", container_id, timeout=30)
        ctd.ctr("task", "delete", "--force", container_id, timeout=30)
    ctd.ctr("containers", "rm", container_id, timeout=30)


def assert_task_running(ctd: Containerd, container_id: str) -> None:
    """containerd says RUNNING (after a failed checkpoint, the client's Resume must work)."""
    try:
        ctd.wait_task_status(container_id, "RUNNING", timeout=10)
    except AssertionError as err:
        resume = ctd.ctr("task", "resume", container_id, timeout=30)
        raise AssertionError(f"{err}; freezer {freezer_state(ctd, container_id)}; `ctr task resume` says: "
                             f"{resume.stderr.strip() or 'ok'}") from None
