"""`start`'s stdin from containerd 2.3 and newer: the bootstrap parameters, protobuf
(as released) and JSON (as its development builds wrote them), beside the legacy
options Any of 1.7 to 2.2."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from google.protobuf import any_pb2
from kybernate.errors import InvalidArgument
from kybernate.protos import bootstrap_pb2, runc_options_pb2
from kybernate.shim.options import decode_create_options_bytes
from kybernate.shim.start import listen_unix, socket_address, socket_path
from kybernate.shim.start_params import StartParams, parse_start_stdin

RUNC_OPTIONS_URL = "containerd.runc.v1.Options"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field, as Go's proto.Marshal writes it."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def runc_options() -> bytes:
    return runc_options_pb2.Options(binary_name="runc", shim_cgroup="/kyb-shims").SerializeToString()


def go_bootstrap_params(container_id: str, namespace: str, socket_dir: str = "") -> bytes:
    """BootstrapParams encoded by hand with upstream's field numbers (instance_id 1,
    namespace 2, log_level 3, extensions 8 of Extension{Any value = 1}, socket_dir 9):
    what containerd 2.3's shim.Command writes, independent of our generated module."""
    any_bytes = _field(1, RUNC_OPTIONS_URL.encode()) + _field(2, runc_options())
    data = (_field(1, container_id.encode()) + _field(2, namespace.encode())
            + _varint(3 << 3) + _varint((1 << 64) - 4)  # LOG_LEVEL_DEBUG, negative as int64
            + _field(4, b"2.3.0") + _field(5, b"/run/containerd/containerd.sock.ttrpc")
            + _field(8, _field(1, any_bytes)))
    if socket_dir:
        data += _field(9, socket_dir.encode())
    return data


def test_protobuf_bootstrap_params_carry_the_options_and_socket_dir() -> None:
    params = parse_start_stdin(go_bootstrap_params("c1", "k8s.io", "/run/k/s"), "c1", "k8s.io")
    assert (params.bootstrap, params.socket_dir) == (True, "/run/k/s")
    decoded = decode_create_options_bytes(params.options)
    assert (decoded.binary_name, decoded.shim_cgroup) == ("runc", "/kyb-shims")
    # Our generated module reads the same bytes the same way.
    parsed = bootstrap_pb2.BootstrapParams.FromString(go_bootstrap_params("c1", "k8s.io"))
    assert parsed.log_level == bootstrap_pb2.LOG_LEVEL_DEBUG and not parsed.HasField("socket_dir")


def test_legacy_options_any_is_not_mistaken_for_parameters() -> None:
    legacy = any_pb2.Any(type_url=RUNC_OPTIONS_URL, value=runc_options()).SerializeToString()
    # An Any parses as BootstrapParams (type_url as instance_id): the id check rejects it.
    assert parse_start_stdin(legacy, "c1", "default") == StartParams(options=legacy)
    assert parse_start_stdin(b"", "c1", "default") == StartParams()
    # Parameters for another container are not ours either.
    other = go_bootstrap_params("c2", "default")
    assert parse_start_stdin(other, "c1", "default") == StartParams(options=other)


def test_json_bootstrap_params() -> None:
    document = {"instance_id": "c1", "namespace": "default", "log_level": 0, "socket_dir": "/run/k/s",
                "extensions": [{"value": {"type_url": "containerd.io/unknown.v1.Thing", "value": "AAEC"}},
                               {"value": {"type_url": RUNC_OPTIONS_URL,
                                          "value": base64.b64encode(runc_options()).decode()}}]}
    params = parse_start_stdin(json.dumps(document).encode(), "c1", "default")
    assert params.bootstrap and params.socket_dir == "/run/k/s"
    assert decode_create_options_bytes(params.options).shim_cgroup == "/kyb-shims"
    with pytest.raises(InvalidArgument, match="not 'c1'"):
        parse_start_stdin(json.dumps({**document, "instance_id": "c9"}).encode(), "c1", "default")
    with pytest.raises(InvalidArgument, match="base64"):
        parse_start_stdin(json.dumps({**document, "extensions": [
            {"value": {"type_url": RUNC_OPTIONS_URL, "value": "***"}}]}).encode(), "c1", "default")
    with pytest.raises(InvalidArgument, match="absolute"):
        parse_start_stdin(json.dumps({**document, "socket_dir": "rel"}).encode(), "c1", "default")


def test_start_command_takes_bootstrap_params_on_stdin(tmp_path: Path) -> None:
    """The `start` command given containerd 2.3's parameters: the socket goes into the
    directory they name (here, a shim already listens there, so start just answers)."""
    socket_dir = Path(f"/tmp/kyb-sd-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    containerd_address = f"/tmp/kyb-test-{os.getpid()}.sock"
    address = socket_address(containerd_address, "default", "c1", str(socket_dir))
    assert address.startswith(f"unix://{socket_dir}/")
    listener = listen_unix(socket_path(address))
    try:
        result = subprocess.run(
            [sys.executable, "-m", "kybernate.shim", "-namespace", "default", "-address",
             containerd_address, "-publish-binary", "/usr/bin/containerd", "-id", "c1", "start"],
            cwd=tmp_path, input=go_bootstrap_params("c1", "default", str(socket_dir)),
            capture_output=True, timeout=30, check=False)
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode() == address
    finally:
        listener.close()
        os.unlink(socket_path(address))
        socket_dir.rmdir()
