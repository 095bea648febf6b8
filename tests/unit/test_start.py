"""The shim command line and the pieces of `start` that need no running server."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from kybernate.shim.flags import ShimFlags, UsageError, parse_flags
from kybernate.shim.start import (
    adjust_oom_score,
    can_connect,
    go_path_join,
    listen_unix,
    move_to_cgroup,
    shim_group,
    socket_address,
    socket_path,
    write_address_file,
)


def test_flags_exactly_as_containerd_passes_them() -> None:
    flags = parse_flags(["-namespace", "default", "-address", "/run/containerd/containerd.sock",
                         "-publish-binary", "/usr/bin/containerd", "-id", "c1", "-debug", "start"])
    assert flags == ShimFlags(namespace="default", address="/run/containerd/containerd.sock",
                              publish_binary="/usr/bin/containerd", id="c1", debug=True,
                              action="start")
    flags = parse_flags(["-namespace", "k8s.io", "-address", "/a", "-publish-binary", "/c",
                         "-id", "c2", "-bundle", "/b/c2", "delete"])
    assert (flags.bundle, flags.bundle_path, flags.action, flags.debug) == (
        "/b/c2", "/b/c2", "delete", False)


def test_flags_go_syntax_variants() -> None:
    flags = parse_flags(["--namespace=ns", "-debug=false", "-v", "-socket-fd=5", "--", "serve"])
    assert (flags.namespace, flags.debug, flags.version, flags.socket_fd, flags.action) == (
        "ns", False, True, 5, "serve")
    assert parse_flags([]).action == ""
    with pytest.raises(UsageError, match="not defined: -bogus"):
        parse_flags(["-bogus", "1", "start"])
    with pytest.raises(UsageError, match="needs an argument: -id"):
        parse_flags(["-id"])
    with pytest.raises(UsageError, match="invalid boolean"):
        parse_flags(["-debug=maybe"])


def test_flags_round_trip_for_serve() -> None:
    flags = ShimFlags(namespace="n", address="/a", publish_binary="/p", id="i", bundle="/b",
                      debug=True, socket_fd=3)
    assert parse_flags([*flags.to_argv(), "serve"]) == ShimFlags(
        namespace="n", address="/a", publish_binary="/p", id="i", bundle="/b", debug=True,
        socket_fd=3, action="serve")


def test_socket_address_is_containerds() -> None:
    expected = hashlib.sha256(b"/run/containerd/containerd.sock/default/c1").hexdigest()
    assert socket_address("/run/containerd/containerd.sock", "default", "c1") == (
        f"unix:///run/containerd/s/{expected}")
    # filepath.Join cleans the path: doubled and trailing slashes do not change the hash.
    assert socket_address("/run//containerd/containerd.sock/", "default", "c1") == (
        socket_address("/run/containerd/containerd.sock", "default", "c1"))
    assert go_path_join("//a", "", "b/../c") == "/a/c"
    assert socket_path("unix:///run/x") == "/run/x"
    with pytest.raises(ValueError):
        socket_path("/run/x")


def test_group_from_annotations(tmp_path: Path) -> None:
    assert shim_group(str(tmp_path), "c1") == "c1"  # no config.json
    spec = {"annotations": {"io.kubernetes.cri.sandbox-id": "pod-sandbox"}}
    (tmp_path / "config.json").write_text(json.dumps(spec))
    assert shim_group(str(tmp_path), "c1") == "pod-sandbox"
    spec["annotations"]["io.containerd.runc.v2.group"] = "explicit"
    (tmp_path / "config.json").write_text(json.dumps(spec))
    assert shim_group(str(tmp_path), "c1") == "explicit"


def test_listen_unix_mode_and_connect(tmp_path: Path) -> None:
    path = str(tmp_path / "sub" / "shim.sock")
    assert not can_connect(path)
    sock = listen_unix(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert can_connect(path)
        with pytest.raises(OSError):
            listen_unix(path)
    finally:
        sock.close()
        os.unlink(path)


def test_address_file_written_atomically(tmp_path: Path) -> None:
    write_address_file(str(tmp_path), "unix:///run/containerd/s/abc")
    write_address_file(str(tmp_path), "unix:///run/containerd/s/def")
    assert (tmp_path / "address").read_text() == "unix:///run/containerd/s/def"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["address"]


def test_start_reuses_a_running_shim_without_spawning(tmp_path: Path) -> None:
    """A second container of a group gets the address of the shim already serving it."""
    group = f"kyb-test-group-{uuid.uuid4().hex[:8]}"
    (tmp_path / "config.json").write_text(json.dumps(
        {"annotations": {"io.containerd.runc.v2.group": group}}))
    containerd_address = f"/tmp/kyb-test-{os.getpid()}.sock"
    address = socket_address(containerd_address, "default", group)
    listener = listen_unix(socket_path(address))
    try:
        result = subprocess.run(
            [sys.executable, "-m", "kybernate.shim", "-namespace", "default", "-address",
             containerd_address, "-publish-binary", "/usr/bin/containerd", "-id", "second",
             "start"], cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
            check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode() == address
        assert result.stderr == b""
        assert (tmp_path / "address").read_text() == address
        listener.settimeout(0.2)
        accepted = []
        while True:  # start probed us once with connect(); it must not have spawned a server
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                break
        assert len(accepted) == 1
        for conn in accepted:
            conn.close()
    finally:
        listener.close()
        os.unlink(socket_path(address))


def test_start_without_namespace_fails_clearly(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "kybernate.shim", "-id", "x", "start"],
                            cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                            check=False)
    assert result.returncode == 1
    assert b"namespace cannot be empty" in result.stderr


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_oom_score_is_parents_plus_one(sleeper: subprocess.Popen) -> None:
    # Raising a score needs no privilege; the "parent" is a second process we own.
    parent = subprocess.Popen(["sleep", "60"])
    try:
        Path(f"/proc/{parent.pid}/oom_score_adj").write_text("300")
        adjust_oom_score(sleeper.pid, parent.pid)
        assert Path(f"/proc/{sleeper.pid}/oom_score_adj").read_text().strip() == "301"
        Path(f"/proc/{parent.pid}/oom_score_adj").write_text("1000")
        adjust_oom_score(sleeper.pid, parent.pid)
        assert Path(f"/proc/{sleeper.pid}/oom_score_adj").read_text().strip() == "1000"
    finally:
        parent.kill()
        parent.wait()


def test_move_to_shim_cgroup(sleeper: subprocess.Popen) -> None:
    name = f"kyb-test-shim-{os.getpid()}"
    root = Path("/sys/fs/cgroup")
    unified = (root / "cgroup.controllers").exists()
    target = root / name if unified else root / "pids" / name
    target.mkdir()
    try:
        move_to_cgroup(sleeper.pid, f"/{name}")
        assert str(sleeper.pid) in (target / "cgroup.procs").read_text().split()
        with pytest.raises(FileNotFoundError, match="does not exist"):
            move_to_cgroup(sleeper.pid, f"/{name}-missing")
    finally:
        parent_procs = (root if unified else root / "pids") / "cgroup.procs"
        parent_procs.write_text(str(sleeper.pid))
        target.rmdir()
