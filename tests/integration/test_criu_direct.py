"""CRIU over swrk against real processes and a real runc container.

Needs root, CRIU 4.2+ and runc; nothing is skipped when they are missing: a missing
dependency is a failure here.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kybernate.criu import (
    CriuClient,
    CriuError,
    DumpOptions,
    RestoreOptions,
    dump_options_from_bundle,
    read_descriptors,
    write_descriptors,
)

from tests.support.bundle import BUSYBOX, make_bundle

pytestmark = pytest.mark.integration


def _counter_script(path: str, pause: str) -> str:
    # The count lives in the shell's memory; the file only shows it, replaced by rename
    # so that a dump never catches it half written.
    return (f"i=0; while true; do i=$((i+1)); echo $i > {path}.tmp; mv {path}.tmp {path}; "
            f"sleep {pause}; done")


def _read_count(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text else None


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def _assert_counter_continues(path: Path, dumped_at: int) -> None:
    """After a restore, the counter goes on from `dumped_at`; a restarted one would
    write 1, 2, ... and fall below it."""
    seen: list[int] = []

    def advanced() -> bool:
        value = _read_count(path)
        if value is not None:
            seen.append(value)
        return value is not None and value > dumped_at + 2

    _wait_for(advanced, 10, f"counter in {path} to pass {dumped_at}")
    assert min(seen) >= dumped_at, f"counter restarted: saw {seen}, dumped at {dumped_at}"


def _alive(pid: int) -> bool:
    """True unless the pid is gone or a zombie (a dead task its parent has not reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _session_members(sid: int) -> list[int]:
    """Pids, zombies included, whose session is `sid`."""
    members: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(stat.rpartition(")")[2].split()[3]) == sid:
            members.append(int(entry))
    return members


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- (1) a plain process tree ---------------------------------------------------------


@pytest.fixture
def session_counter(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    count = tmp_path / "count"
    with open(tmp_path / "out.log", "wb") as out:
        proc = subprocess.Popen(
            [str(BUSYBOX), "sh", "-c", _counter_script(str(count), "0.02")],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
        )
    try:
        yield proc, count
    finally:
        with_pgid_killed(proc.pid)
        proc.wait()


def with_pgid_killed(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_process_tree_dump_then_restore_continues(
    tmp_path: Path, session_counter: tuple[subprocess.Popen[bytes], Path]
) -> None:
    proc, count = session_counter
    _wait_for(lambda: (_read_count(count) or 0) >= 5, 10, "counter to start")
    images, work = tmp_path / "images", tmp_path / "work"
    notified: list[str] = []

    async def on_notify(script: str) -> None:
        notified.append(script)

    client = CriuClient()
    asyncio.run(client.dump(
        DumpOptions(images_dir=images, work_dir=work, pid=proc.pid, root=Path("/")),
        notify=on_notify,
    ))
    # leave_running=False: CRIU killed the tree; reap it so its pid is free again.
    assert proc.wait(timeout=10) == -signal.SIGKILL
    dumped_at = _read_count(count)
    assert dumped_at is not None and dumped_at >= 5
    assert "post-dump" in notified and (images / "inventory.img").exists()
    # Its children were reparented to init; their pids must be free before CRIU reuses them.
    _wait_for(lambda: not _session_members(proc.pid), 5, "the dumped tree to be reaped")
    time.sleep(0.1)
    assert _read_count(count) == dumped_at, "the tree still ran after the dump"

    restored = asyncio.run(client.restore(RestoreOptions(images_dir=images, work_dir=work),
                                          notify=on_notify))
    try:
        assert restored == proc.pid  # CRIU restores the same pids
        assert "post-restore" in notified
        _assert_counter_continues(count, dumped_at)
    finally:
        with_pgid_killed(restored)
        os.waitpid(restored, 0)  # rst_sibling: the restored root is our child


# --- (2) a runc container, dumped directly, restored by stock runc --------------------


class RuncContainer:
    """A detached runc container with its own state root and stdio pipes."""

    def __init__(self, base: Path) -> None:
        self.id = f"kyb-criu-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.root = base / "runc-root"
        self.bundle = base / "bundle"
        self.cgroups_path = f"/{self.id}"
        self.count = self.bundle / "rootfs" / "count"
        self._pipe_fds: list[int] = []

    def runc(self, *args: str, check: bool = False,
             **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["runc", "--root", str(self.root), *args], check=check, **kwargs)

    def run_detached(self) -> None:
        make_bundle(self.bundle, ["/bin/sh", "-c", _counter_script("/count", "0.02")],
                    cgroups_path=self.cgroups_path)
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        self._pipe_fds += [stdin_w, stdout_r, stderr_r]
        try:
            result = self.runc("run", "-d", "--bundle", str(self.bundle), self.id,
                               stdin=stdin_r, stdout=stdout_w, stderr=stderr_w, timeout=30)
        finally:
            for fd in (stdin_r, stdout_w, stderr_w):
                os.close(fd)
        if result.returncode != 0:
            os.set_blocking(stderr_r, False)
            raise AssertionError(f"runc run failed: {os.read(stderr_r, 65536)!r}")

    def state(self) -> dict[str, Any]:
        result = self.runc("state", self.id, capture_output=True, check=True)
        return json.loads(result.stdout)

    def cleanup(self) -> None:
        self.runc("delete", "--force", self.id, capture_output=True)
        for fd in self._pipe_fds:
            os.close(fd)
        self._pipe_fds.clear()


@pytest.fixture
def runc_container(tmp_path: Path) -> Iterator[RuncContainer]:
    container = RuncContainer(tmp_path)
    try:
        container.run_detached()
        yield container
    finally:
        container.cleanup()


def test_runc_container_dumped_directly_restores_with_stock_runc(
    tmp_path: Path, runc_container: RuncContainer
) -> None:
    c = runc_container
    pid = int(c.state()["pid"])
    _wait_for(lambda: (_read_count(c.count) or 0) >= 5, 10, "container counter to start")
    freezer = Path("/sys/fs/cgroup/freezer") / c.cgroups_path.lstrip("/")
    assert freezer.is_dir(), f"container has no v1 freezer cgroup at {freezer}"

    images, work = tmp_path / "images", tmp_path / "dump-work"
    opts = dump_options_from_bundle(
        c.bundle, pid=pid, images_dir=images, work_dir=work, freeze_cgroup=str(freezer),
        leave_running=False, tcp_established=False, ext_unix_sk=False, file_locks=False,
        terminal=False,
    )
    write_descriptors(images, pid)  # before the dump: the init is gone after it
    asyncio.run(CriuClient().dump(opts))

    dumped_at = _read_count(c.count)
    assert dumped_at is not None and dumped_at >= 5
    _wait_for(lambda: not _alive(pid), 5, f"container init {pid} to be gone after an exit dump")
    assert all(t.startswith("pipe:[") for t in read_descriptors(images))

    # runc still has the stopped container; restore needs the id free.
    c.runc("delete", "--force", c.id, capture_output=True, check=True)
    with open(tmp_path / "restore-stdio.log", "wb") as stdio:
        result = c.runc(
            "restore", "--detach", "--image-path", str(images),
            "--work-path", str(tmp_path / "restore-work"), "--bundle", str(c.bundle), c.id,
            stdin=subprocess.DEVNULL, stdout=stdio, stderr=stdio, timeout=60,
        )
    assert result.returncode == 0, (tmp_path / "restore-stdio.log").read_text()
    state = c.state()
    assert state["status"] == "running"
    _assert_counter_continues(c.count, dumped_at)


# --- (3) CRIU failures carry CRIU's own line ---------------------------------------


def test_dump_of_missing_pid_raises_with_criu_error_line(tmp_path: Path) -> None:
    pid = _dead_pid()
    opts = DumpOptions(images_dir=tmp_path / "img", work_dir=tmp_path / "work", pid=pid,
                       root=Path("/"))
    with pytest.raises(CriuError) as caught:
        asyncio.run(CriuClient().dump(opts))
    err = caught.value
    assert err.log_path == tmp_path / "work" / "dump.log" and err.log_path.exists()
    assert err.log_line is not None and err.log_line.startswith("Error (")
    assert str(pid) in err.log_line
    assert err.log_line in str(err) and str(err.log_path) in str(err)
    assert "RLIMIT_NOFILE" not in str(err)


def test_failing_notify_callback_rolls_dump_back(
    tmp_path: Path, session_counter: tuple[subprocess.Popen[bytes], Path]
) -> None:
    proc, count = session_counter
    _wait_for(lambda: (_read_count(count) or 0) >= 2, 10, "counter to start")

    async def refuse(script: str) -> None:
        if script == "pre-dump":
            raise RuntimeError("refused by test")

    opts = DumpOptions(images_dir=tmp_path / "img", work_dir=tmp_path / "work",
                       pid=proc.pid, root=Path("/"))
    with pytest.raises(CriuError, match="refused by test"):
        asyncio.run(CriuClient().dump(opts, notify=refuse))
    # CRIU gave up before seizing anything: the tree keeps counting.
    before = _read_count(count) or 0
    _wait_for(lambda: (_read_count(count) or 0) > before, 5, "counter to keep running")
    assert proc.poll() is None


def test_missing_criu_binary_is_a_clear_error(tmp_path: Path) -> None:
    client = CriuClient(str(tmp_path / "no-such-criu"))
    with pytest.raises(CriuError, match="no-such-criu"):
        asyncio.run(client.version())


def test_frozen_container_dump_leave_running_keeps_it_frozen_then_it_resumes(
    tmp_path: Path, runc_container: RuncContainer
) -> None:
    """The agent's order: freeze first, then dump through the freezer path."""
    c = runc_container
    pid = int(c.state()["pid"])
    _wait_for(lambda: (_read_count(c.count) or 0) >= 2, 10, "container counter to start")
    freezer = Path("/sys/fs/cgroup/freezer") / c.cgroups_path.lstrip("/")
    state = freezer / "freezer.state"
    state.write_text("FROZEN")
    _wait_for(lambda: state.read_text().strip() == "FROZEN", 10, "the freezer to settle")
    frozen_at = _read_count(c.count)

    opts = dump_options_from_bundle(
        c.bundle, pid=pid, images_dir=tmp_path / "images", work_dir=tmp_path / "work",
        freeze_cgroup=str(freezer), leave_running=True, tcp_established=False,
        ext_unix_sk=False, file_locks=False, terminal=False,
    )
    opts.timeout_s = 20  # a frozen tree CRIU cannot seize would hang until this
    write_descriptors(opts.images_dir, pid)
    asyncio.run(CriuClient().dump(opts))

    assert (opts.images_dir / "inventory.img").exists()
    assert state.read_text().strip() == "FROZEN", "CRIU did not leave the freezer as it was"
    assert _read_count(c.count) == frozen_at
    state.write_text("THAWED")
    assert frozen_at is not None
    _assert_counter_continues(c.count, frozen_at)
