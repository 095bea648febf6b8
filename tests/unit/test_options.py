"""Create and checkpoint options: every wire form decodes to the same dataclass."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import any_pb2
from kybernate.errors import InvalidArgument
from kybernate.protos import runc_options_pb2, runctypes_pb2, runtimeoptions_pb2
from kybernate.shim.options import (
    CheckpointRequestOptions,
    ShimOptions,
    decode_checkpoint_options,
    decode_create_options,
    decode_create_options_bytes,
    load_options,
    save_options,
)


def bare_any(message) -> any_pb2.Any:
    return any_pb2.Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())


def test_no_options_decode_to_defaults() -> None:
    assert decode_create_options(None) == ShimOptions()
    assert decode_create_options(any_pb2.Any()) == ShimOptions()
    assert decode_checkpoint_options(None) == CheckpointRequestOptions()


def test_runc_v1_options_every_field() -> None:
    msg = runc_options_pb2.Options(
        no_pivot_root=True, no_new_keyring=True, shim_cgroup="/kyb/shim", io_uid=1000,
        io_gid=1001, binary_name="/usr/local/bin/runc-wrap", root="/run/kyb-runc",
        criu_path="/usr/sbin/criu", systemd_cgroup=True, criu_image_path="/img",
        criu_work_path="/work")
    assert decode_create_options(bare_any(msg)) == ShimOptions(
        binary_name="/usr/local/bin/runc-wrap", root="/run/kyb-runc", systemd_cgroup=True,
        no_pivot_root=True, no_new_keyring=True, shim_cgroup="/kyb/shim", io_uid=1000,
        io_gid=1001, criu_path="/usr/sbin/criu", criu_image_path="/img", criu_work_path="/work")


def test_type_url_with_host_prefix_is_accepted() -> None:
    msg = runc_options_pb2.Options(root="/r")
    packed = any_pb2.Any()
    packed.Pack(msg)  # type.googleapis.com/containerd.runc.v1.Options
    assert decode_create_options(packed).root == "/r"


def test_linux_runc_create_options() -> None:
    msg = runctypes_pb2.CreateOptions(no_pivot_root=True, shim_cgroup="/pod", io_uid=7, io_gid=8,
                                      criu_work_path="/w", criu_image_path="/i", no_new_keyring=True)
    opts = decode_create_options(bare_any(msg))
    assert (opts.no_pivot_root, opts.shim_cgroup, opts.io_uid, opts.io_gid) == (True, "/pod", 7, 8)
    assert (opts.criu_work_path, opts.criu_image_path, opts.no_new_keyring) == ("/w", "/i", True)
    assert opts.runc_binary() == "runc" and opts.runc_root("ns1") == "/run/containerd/runc/ns1"
    assert ShimOptions(root="/run/kyb").runc_root("ns1") == "/run/kyb/ns1"


def test_runtime_options_config_path_toml(tmp_path: Path) -> None:
    config = tmp_path / "kybernate.toml"
    config.write_text('BinaryName = "/opt/runc"\nRoot = "/run/r"\nSystemdCgroup = true\n'
                      'io_uid = 5\nKybernateOnlySetting = "kept for others"\n')
    cri = runtimeoptions_pb2.Options(type_url="containerd.runc.v1.Options",
                                     config_path=str(config))
    opts = decode_create_options(bare_any(cri))
    assert opts == ShimOptions(binary_name="/opt/runc", root="/run/r", systemd_cgroup=True, io_uid=5)


def test_runtime_options_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("Root = [unterminated")
    with pytest.raises(InvalidArgument, match="not valid TOML"):
        decode_create_options(bare_any(runtimeoptions_pb2.Options(config_path=str(bad))))
    with pytest.raises(InvalidArgument, match="cannot read"):
        decode_create_options(bare_any(runtimeoptions_pb2.Options(
            config_path=str(tmp_path / "missing.toml"))))
    wrong_type = tmp_path / "wrong.toml"
    wrong_type.write_text("IoUid = true\n")
    with pytest.raises(InvalidArgument, match="io_uid must be int"):
        decode_create_options(bare_any(runtimeoptions_pb2.Options(config_path=str(wrong_type))))


def test_unknown_type_url_is_invalid_argument_naming_it() -> None:
    odd = any_pb2.Any(type_url="example.com/acme.Options", value=b"\x08\x01")
    with pytest.raises(InvalidArgument, match="acme.Options"):
        decode_create_options(odd)
    with pytest.raises(InvalidArgument, match="acme.Options"):
        decode_checkpoint_options(odd)


def test_create_options_from_start_stdin_bytes() -> None:
    data = bare_any(runc_options_pb2.Options(shim_cgroup="/x")).SerializeToString()
    assert decode_create_options_bytes(data).shim_cgroup == "/x"
    with pytest.raises(InvalidArgument):
        decode_create_options_bytes(b"\xff\xff\xff")


@pytest.mark.parametrize("message_type", [runc_options_pb2.CheckpointOptions,
                                          runctypes_pb2.CheckpointOptions])
def test_checkpoint_options_both_forms(message_type) -> None:
    msg = message_type(exit=True, open_tcp=True, external_unix_sockets=True, terminal=True,
                       file_locks=True, empty_namespaces=["network", "ipc"],
                       cgroups_mode="soft", image_path="/ckpt/img", work_path="/ckpt/work")
    encoded = bare_any(msg)
    assert decode_checkpoint_options(encoded) == CheckpointRequestOptions(
        exit=True, open_tcp=True, external_unix_sockets=True, terminal=True, file_locks=True,
        empty_namespaces=("network", "ipc"), cgroups_mode="soft", image_path="/ckpt/img",
        work_path="/ckpt/work")


def test_linux_checkpoint_field_numbers_differ_on_the_wire() -> None:
    # work_path=8 / image_path=9 in the old form; a decoder that mixed them up would swap them.
    old = runctypes_pb2.CheckpointOptions(image_path="/img", work_path="/work")
    new = runc_options_pb2.CheckpointOptions.FromString(old.SerializeToString())
    assert (new.image_path, new.work_path) == ("/work", "/img")
    decoded = decode_checkpoint_options(bare_any(old))
    assert (decoded.image_path, decoded.work_path) == ("/img", "/work")


def test_options_file_round_trip(tmp_path: Path) -> None:
    assert load_options(str(tmp_path)) is None
    opts = ShimOptions(binary_name="runc", root="/run/x", io_uid=3, systemd_cgroup=True)
    save_options(str(tmp_path), opts)
    assert load_options(str(tmp_path)) == opts
    (tmp_path / "options.json").write_text("[1, 2]")
    with pytest.raises(InvalidArgument):
        load_options(str(tmp_path))
