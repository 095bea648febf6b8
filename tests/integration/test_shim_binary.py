"""The shim binary's `start` and `delete` contract, driven directly as containerd does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import empty_pb2
from kybernate.protos import shim_pb2
from kybernate.shim.delete import encode_delete_response
from kybernate.shim.options import ShimOptions, save_options
from kybernate.shim.start import socket_address, socket_path
from kybernate.shim.ttrpc import TtrpcClient

from tests.support.bundle import make_bundle

SHIM = str(Path(sys.executable).parent / "containerd-shim-kybernate-v1")
TASK_SERVICE = "containerd.task.v2.Task"


def shim_command(address: str, container_id: str, action: str, *, namespace: str = "kyb-bin",
                 bundle: Path | None = None) -> list[str]:
    argv = [SHIM, "-namespace", namespace, "-address", address, "-publish-binary",
            "/usr/bin/containerd", "-id", container_id]
    if bundle is not None:
        argv += ["-bundle", str(bundle)]
    return [*argv, action]


def run_shim(argv: list[str], cwd: Path, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, TTRPC_ADDRESS=f"/tmp/kyb-no-containerd-{os.getpid()}.sock.ttrpc")
    return subprocess.run(argv, cwd=cwd, input=stdin, capture_output=True, timeout=60, env=env,
                          check=False)


def serving_pids(path: str) -> list[int]:
    """Processes that hold the socket `path` (by the inode in /proc/net/unix)."""
    inodes = set()
    with open("/proc/net/unix") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path:
                inodes.add(fields[6])
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue  # the process is gone
        links = set()
        for fd in fds:
            # A descriptor closed while we look (a freshly forked shim closes the
            # template's) must not hide the process's other descriptors.
            with contextlib.suppress(OSError):
                links.add(os.readlink(fd))
        if any(f"socket:[{inode}]" in links for inode in inodes):
            pids.append(int(proc.name))
    return pids


def wait_for_server(path: str, timeout: float = 10.0) -> list[int]:
    """The serving processes of `path`, once there is one: `start` hands the listening
    socket over a unix socket, and while it is in flight no process holds it."""
    deadline = time.monotonic() + timeout
    while not (servers := serving_pids(path)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return servers


async def call(path: str, method: str, request, response_type):
    client = await TtrpcClient.connect(path)
    try:
        return await client.call(TASK_SERVICE, method, request, response_type, timeout=10,
                                 metadata={"containerd-namespace-ttrpc": ["kyb-bin"]})
    finally:
        await client.close()


@pytest.fixture
def fake_containerd_address() -> str:
    return f"/tmp/kyb-bin-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"


@pytest.fixture
def started_shim(tmp_path: Path, fake_containerd_address: str) -> Iterator[dict]:
    """A real `start`: a serving shim process for an empty bundle; killed afterwards."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2"}))
    os.mkfifo(bundle / "log")
    log_reader = os.open(bundle / "log", os.O_RDONLY | os.O_NONBLOCK)
    container_id = f"c-{uuid.uuid4().hex[:8]}"
    address = socket_address(fake_containerd_address, "kyb-bin", container_id)
    state = {"bundle": bundle, "id": container_id, "address": address, "log": log_reader,
             "path": socket_path(address)}
    try:
        started = time.monotonic()
        state["result"] = run_shim(shim_command(fake_containerd_address, container_id, "start"),
                                   cwd=bundle)
        state["elapsed"] = time.monotonic() - started
        yield state
    finally:
        for pid in serving_pids(state["path"]):
            os.kill(pid, 9)
        if os.path.exists(state["path"]):
            os.unlink(state["path"])
        os.close(log_reader)


def test_start_prints_address_and_serves(started_shim: dict) -> None:
    result = started_shim["result"]
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == started_shim["address"]
    assert result.stderr == b""  # containerd reads stderr too: nothing may land there
    assert (started_shim["bundle"] / "address").read_text() == started_shim["address"]
    path = started_shim["path"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    servers = wait_for_server(path)
    assert len(servers) == 1, servers
    server = servers[0]
    # Detached: its own session, stdio on /dev/null, one more oom_score_adj than its parent.
    assert os.getsid(server) == server
    for fd in (0, 1):
        assert os.readlink(f"/proc/{server}/fd/{fd}") == "/dev/null"
    ours = int(Path("/proc/self/oom_score_adj").read_text())
    assert int(Path(f"/proc/{server}/oom_score_adj").read_text()) == min(ours + 1, 1000)
    response = asyncio.run(call(path, "Connect", shim_pb2.ConnectRequest(id=started_shim["id"]),
                                shim_pb2.ConnectResponse))
    assert response.shim_pid == server
    assert response.task_pid == 0  # no such container yet: answered, not an error
    # It logs into the bundle's FIFO, where containerd reads.
    logged = read_log_until(started_shim["log"], started_shim["id"].encode())
    assert started_shim["id"].encode() in logged
    # SIGUSR1 dumps where the shim's tasks wait, into the same log.
    os.kill(server, signal.SIGUSR1)
    assert b"task ttrpc-serve" in read_log_until(started_shim["log"], b"task ttrpc-serve")
    assert serving_pids(path) == [server]  # and the shim keeps serving


def read_log_until(fd: int, marker: bytes, timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    logged = b""
    while time.monotonic() < deadline and marker not in logged:
        try:
            logged += os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(0.05)
    return logged


def test_start_reuses_the_running_shim(started_shim: dict, fake_containerd_address: str) -> None:
    assert started_shim["result"].returncode == 0
    first = wait_for_server(started_shim["path"])
    bundle = started_shim["bundle"]
    (bundle / "address").unlink()
    again = run_shim(shim_command(fake_containerd_address, started_shim["id"], "start"),
                     cwd=bundle)
    assert again.returncode == 0, again.stderr.decode()
    assert again.stdout.decode() == started_shim["address"]
    assert (bundle / "address").read_text() == started_shim["address"]
    assert serving_pids(started_shim["path"]) == first


def test_shutdown_stops_the_shim_and_removes_its_socket(started_shim: dict) -> None:
    assert started_shim["result"].returncode == 0
    path = started_shim["path"]
    [server] = wait_for_server(path)
    asyncio.run(call(path, "Shutdown", shim_pb2.ShutdownRequest(id=started_shim["id"]),
                     empty_pb2.Empty))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (os.path.exists(path) or Path(f"/proc/{server}").exists()):
        time.sleep(0.05)
    assert not os.path.exists(path)
    assert not Path(f"/proc/{server}").exists()


def test_start_replaces_a_stale_socket(tmp_path: Path, fake_containerd_address: str) -> None:
    container_id = f"stale-{uuid.uuid4().hex[:8]}"
    path = socket_path(socket_address(fake_containerd_address, "kyb-bin", container_id))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens: a killed shim's leftover
    try:
        result = run_shim(shim_command(fake_containerd_address, container_id, "start"),
                          cwd=tmp_path)
        assert result.returncode == 0, result.stderr.decode()
        assert len(serving_pids(path)) == 1
    finally:
        for pid in serving_pids(path):
            os.kill(pid, 9)
        if os.path.exists(path):
            os.unlink(path)


def decode_delete_response(result: subprocess.CompletedProcess[bytes]) -> shim_pb2.DeleteResponse:
    assert result.returncode == 0, result.stderr.decode()
    response = shim_pb2.DeleteResponse.FromString(result.stdout)
    assert response.exit_status == 137
    assert abs(response.exited_at.ToNanoseconds() - time.time_ns()) < 60 * 10**9
    return response


def test_delete_on_a_missing_bundle(tmp_path: Path, fake_containerd_address: str) -> None:
    gone = tmp_path / "gone"
    result = run_shim(shim_command(fake_containerd_address, "never-existed", "delete",
                                   bundle=gone), cwd=tmp_path)
    response = decode_delete_response(result)
    assert response.pid == 0
    assert result.stderr == b""


def test_delete_force_deletes_the_runc_container(tmp_path: Path,
                                                 fake_containerd_address: str) -> None:
    container_id = f"kyb-del-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    namespace = "kyb-bin"
    runc_base = tmp_path / "runc-root"
    runc_root = runc_base / namespace
    bundle = make_bundle(tmp_path / container_id, ["sleep", "600"],
                         cgroups_path=f"/{container_id}")
    save_options(str(bundle), ShimOptions(root=str(runc_base)))
    stale = f"/tmp/kyb-stale-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"
    try:
        subprocess.run(["runc", "--root", str(runc_root), "run", "--detach", "--pid-file",
                        str(bundle / "init.pid"), "--bundle", str(bundle), container_id],
                       check=True, timeout=60, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        init_pid = int((bundle / "init.pid").read_text())
        # A socket left by a killed shim is removed too.
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(stale)
        dead.close()
        (bundle / "address").write_text(f"unix://{stale}")
        result = run_shim(shim_command(fake_containerd_address, container_id, "delete",
                                       namespace=namespace, bundle=bundle), cwd=bundle)
        response = decode_delete_response(result)
        assert response.pid == init_pid
        state = subprocess.run(["runc", "--root", str(runc_root), "state", container_id],
                               capture_output=True, timeout=30, check=False)
        assert state.returncode != 0 and b"does not exist" in state.stderr
        assert not Path(f"/proc/{init_pid}").exists() or \
            "Z" in Path(f"/proc/{init_pid}/stat").read_text().split()[2]
        assert not os.path.exists(stale)
    finally:
        subprocess.run(["runc", "--root", str(runc_root), "delete", "--force", container_id],
                       capture_output=True, timeout=30, check=False)
        if os.path.exists(stale):
            os.unlink(stale)


@pytest.mark.parametrize("pid, status, at_ns", [
    (0, 137, 1_700_000_000_000_000_000), (4_294_967_295, 137, 1_700_000_000_123_456_789),
    (12345, 0, 5), (1, 255, 0)])
def test_hand_encoded_delete_response_matches_protobuf(pid: int, status: int, at_ns: int) -> None:
    decoded = shim_pb2.DeleteResponse.FromString(encode_delete_response(pid, status, at_ns))
    assert (decoded.pid, decoded.exit_status) == (pid, status)
    assert decoded.HasField("exited_at")
    assert decoded.exited_at.ToNanoseconds() == at_ns
    expected = shim_pb2.DeleteResponse(pid=pid, exit_status=status)
    expected.exited_at.FromNanoseconds(at_ns)
    assert shim_pb2.DeleteResponse.FromString(expected.SerializeToString()) == decoded
