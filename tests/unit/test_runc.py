"""Runc wrapper against the real runc binary and busybox bundles."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from kybernate.errors import AlreadyExists, InvalidArgument, NotFound
from kybernate.runtime.reaper import Reaper, read_to_end
from kybernate.runtime.runc import (
    ContainerExists,
    ContainerNotFound,
    ProcessNotFound,
    Runc,
    RuncError,
    last_error_message,
)

from tests.support.runc_sandbox import RuncSandbox, runc_sandbox, with_reaper

T = TypeVar("T")


@pytest.fixture
def sandbox() -> Iterator[RuncSandbox]:
    with runc_sandbox("runc") as box:
        yield box


class PipeIO:
    """Minimal RuncIO: real pipes for the container's stdio, read back by the test."""

    def __init__(self) -> None:
        self.stdin_r, self.stdin_w = os.pipe()
        self.stdout_r, self.stdout_w = os.pipe()
        self.stderr_r, self.stderr_w = os.pipe()
        self.closed_after_start = False

    def runc_fds(self) -> tuple[int | None, int | None, int | None]:
        return self.stdin_r, self.stdout_w, self.stderr_w

    def close_after_start(self) -> None:
        if not self.closed_after_start:
            for fd in (self.stdin_r, self.stdout_w, self.stderr_w):
                os.close(fd)
            self.closed_after_start = True

    def close(self) -> None:
        self.close_after_start()
        for fd in (self.stdin_w, self.stdout_r, self.stderr_r):
            try:
                os.close(fd)
            except OSError:
                pass


def run_with(sandbox: RuncSandbox, body: Callable[[Reaper, Runc], Awaitable[T]]) -> T:
    return with_reaper(lambda reaper: body(reaper, sandbox.runc(reaper)))


def read_pid(path: Path) -> int:
    return int(path.read_text().strip())


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("PPid:"))


def test_last_error_message_takes_the_last_error_line() -> None:
    log = "\n".join([
        json.dumps({"level": "warning", "msg": "ignore me", "time": "t"}),
        json.dumps({"level": "error", "msg": "first", "time": "t"}),
        json.dumps({"level": "info", "msg": "later info", "time": "t"}),
        json.dumps({"level": "error", "msg": "container does not exist", "time": "t"}),
    ])
    assert last_error_message(log) == "container does not exist"
    assert last_error_message("") == ""
    assert last_error_message("plain text failure\n") == "plain text failure"


def test_global_args_match_containerd() -> None:
    runc = Runc(Reaper(), binary="/usr/bin/runc", root="/run/x", systemd_cgroup=True)
    assert runc.global_args("/b/log.json") == [
        "/usr/bin/runc", "--root", "/run/x", "--log", "/b/log.json", "--log-format", "json",
        "--systemd-cgroup",
    ]


def test_version(sandbox: RuncSandbox) -> None:
    async def body(reaper: Reaper, runc: Runc) -> str:
        return await runc.version()

    version = run_with(sandbox, body)
    expected = subprocess.run(["runc", "--version"], capture_output=True, text=True, check=True).stdout
    assert version and f"runc version {version}" in expected


def test_lifecycle_with_stdio_pause_update_kill_delete(sandbox: RuncSandbox) -> None:
    cid = sandbox.new_id()
    cgroup = sandbox.new_cgroup()
    bundle = sandbox.bundle(cid, ["sh", "-c", "echo hello-out; echo hello-err >&2; exec sleep 60"],
                            cgroups_path=cgroup)
    pid_file = sandbox.dir / f"{cid}.pid"

    async def body(reaper: Reaper, runc: Runc) -> None:
        io = PipeIO()
        try:
            await runc.create(cid, str(bundle), pid_file=str(pid_file), io=io)
            assert io.closed_after_start
            pid = read_pid(pid_file)
            state = await runc.state(cid)
            assert (state["id"], state["pid"], state["status"]) == (cid, pid, "created")

            await runc.start(cid)
            loop = asyncio.get_running_loop()
            reading = asyncio.ensure_future(read_to_end(loop, io.stdout_r))
            reading_err = asyncio.ensure_future(read_to_end(loop, io.stderr_r))
            assert (await runc.state(cid))["status"] == "running"
            assert pid in await runc.ps(cid)

            await runc.pause(cid)
            assert (await runc.state(cid))["status"] == "paused"
            freezer = Path("/sys/fs/cgroup/freezer") / cgroup.lstrip("/") / "freezer.state"
            assert freezer.read_text().strip() == "FROZEN"
            await runc.resume(cid)
            assert (await runc.state(cid))["status"] == "running"

            await runc.update(cid, {"pids": {"limit": 42}})
            pids_max = Path("/sys/fs/cgroup/pids") / cgroup.lstrip("/") / "pids.max"
            assert pids_max.read_text().strip() == "42"

            await runc.kill(cid, signal.SIGKILL)
            exit_ = await reaper.wait_for(pid, timeout=10)
            assert exit_.status == 128 + signal.SIGKILL
            assert await reading == b"hello-out\n"
            assert await reading_err == b"hello-err\n"

            with pytest.raises(ProcessNotFound) as gone:
                await runc.kill(cid, signal.SIGTERM)
            assert isinstance(gone.value, NotFound)

            await runc.delete(cid)
            with pytest.raises(ContainerNotFound) as missing:
                await runc.state(cid)
            assert isinstance(missing.value, NotFound) and isinstance(missing.value, RuncError)
            assert "does not exist" in str(missing.value)
        finally:
            io.close()

    run_with(sandbox, body)


def test_exec_detached_process(sandbox: RuncSandbox) -> None:
    cid = sandbox.new_id()
    bundle = sandbox.bundle(cid, ["sleep", "60"])

    async def body(reaper: Reaper, runc: Runc) -> None:
        await runc.create(cid, str(bundle), pid_file=str(sandbox.dir / "init.pid"))
        await runc.start(cid)
        io = PipeIO()
        try:
            spec = json.loads((bundle / "config.json").read_text())["process"]
            spec["args"] = ["sh", "-c", "echo exec-$((6*7)); exit 3"]
            exec_pid_file = sandbox.dir / "exec.pid"
            await runc.exec(cid, spec, pid_file=str(exec_pid_file), io=io)
            exec_pid = read_pid(exec_pid_file)
            out = await read_to_end(asyncio.get_running_loop(), io.stdout_r)
            assert out == b"exec-42\n"
            assert (await reaper.wait_for(exec_pid, timeout=10)).status == 3
            # The process file was temporary.
            assert not list(sandbox.dir.glob("runc-process-*"))
        finally:
            io.close()
        await runc.delete(cid, force=True)

    run_with(sandbox, body)


def test_errors_carry_runcs_message(sandbox: RuncSandbox) -> None:
    cid = sandbox.new_id()
    bundle = sandbox.bundle(cid, ["sleep", "60"])
    missing_bundle = sandbox.dir / "no-such-bundle"

    async def body(reaper: Reaper, runc: Runc) -> None:
        with pytest.raises(RuncError) as bad:
            await runc.create(cid, str(missing_bundle), pid_file=str(sandbox.dir / "x.pid"))
        assert "no-such-bundle" in str(bad.value) or "config.json" in str(bad.value)
        assert not isinstance(bad.value, NotFound)

        absent = f"kyb-absent-{os.getpid()}"
        with pytest.raises(ContainerNotFound) as not_found:
            await runc.kill(absent, signal.SIGTERM)
        assert str(not_found.value) == f"runc kill {absent}: container does not exist"

        await runc.create(cid, str(bundle), pid_file=str(sandbox.dir / "a.pid"))
        with pytest.raises(ContainerExists) as dup:
            await runc.create(cid, str(bundle), pid_file=str(sandbox.dir / "b.pid"))
        assert isinstance(dup.value, AlreadyExists)
        assert (await runc.list_containers())[0]["id"] == cid
        await runc.delete(cid, force=True)

        with pytest.raises(InvalidArgument):
            await runc.state("--root")

        missing_binary = Runc(reaper, binary=str(sandbox.dir / "no-runc"), root=str(sandbox.root))
        with pytest.raises(RuncError) as no_binary:
            await missing_binary.state(cid)
        assert "no-runc" in str(no_binary.value)

    run_with(sandbox, body)


def test_restore_from_runc_checkpoint_is_our_child(sandbox: RuncSandbox) -> None:
    cid = sandbox.new_id()
    bundle = sandbox.bundle(cid, ["sh", "-c", "i=0; while true; do i=$((i+1)); sleep 0.05; done"])
    images, work = sandbox.dir / "images", sandbox.dir / "work"
    images.mkdir()
    work.mkdir()

    async def body(reaper: Reaper, runc: Runc) -> None:
        await runc.create(cid, str(bundle), pid_file=str(sandbox.dir / "init.pid"))
        await runc.start(cid)
        first_pid = read_pid(sandbox.dir / "init.pid")
        # runc's checkpoint stops the container (the exit is ours to reap).
        await runc.checkpoint(cid, image_path=str(images), work_path=str(work))
        assert (images / "inventory.img").exists()
        await reaper.wait_for(first_pid, timeout=10)
        await runc.delete(cid, force=True)

        restored_pid_file = sandbox.dir / "restored.pid"
        await runc.restore(cid, str(bundle), image_path=str(images), work_path=str(work),
                           pid_file=str(restored_pid_file))
        pid = read_pid(restored_pid_file)
        assert (await runc.state(cid))["status"] == "running"
        assert parent_pid(pid) == os.getpid()
        await runc.kill(cid, signal.SIGKILL)
        assert (await reaper.wait_for(pid, timeout=10)).status == 128 + signal.SIGKILL
        await runc.delete(cid)

    run_with(sandbox, body)
