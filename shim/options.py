"""Create and checkpoint options, decoded from whichever form the client sent.

Create options arrive as an Any in one of three forms:
- `containerd.runc.v1.Options` (newer clients),
- `containerd.linux.runc.CreateOptions` (containerd 1.7's client for a runtime whose
  name does not start with `io.containerd.runc`),
- `runtimeoptions.v1.Options` (CRI), whose TOML body or `config_path` file holds the
  runtime's options table (keys as runc's Go fields, `BinaryName`, or snake_case).
Checkpoint options arrive as `containerd.runc.v1.CheckpointOptions` or
`containerd.linux.runc.CheckpointOptions`. Both decode into one frozen dataclass each.

The shim saves the create options it was given into `options.json` in the bundle, so
that `delete` (a separate process, often run after the server died) finds the runc
binary and root the container was created with.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any

from kybernate.errors import InvalidArgument

if TYPE_CHECKING:
    from google.protobuf import any_pb2

RUNC_OPTIONS = "containerd.runc.v1.Options"
LINUX_RUNC_CREATE_OPTIONS = "containerd.linux.runc.CreateOptions"
RUNTIME_OPTIONS = "runtimeoptions.v1.Options"
RUNC_CHECKPOINT_OPTIONS = "containerd.runc.v1.CheckpointOptions"
LINUX_RUNC_CHECKPOINT_OPTIONS = "containerd.linux.runc.CheckpointOptions"

OPTIONS_FILE = "options.json"
DEFAULT_RUNC_BINARY = "runc"
DEFAULT_RUNC_ROOT_BASE = "/run/containerd/runc"


@dataclasses.dataclass(frozen=True)
class ShimOptions:
    """What the shim needs from the create options; defaults mean "not set"."""

    binary_name: str = ""
    root: str = ""
    systemd_cgroup: bool = False
    no_pivot_root: bool = False
    no_new_keyring: bool = False
    shim_cgroup: str = ""
    io_uid: int = 0
    io_gid: int = 0
    criu_path: str = ""
    criu_image_path: str = ""
    criu_work_path: str = ""

    def runc_binary(self) -> str:
        return self.binary_name or DEFAULT_RUNC_BINARY

    def runc_root(self, namespace: str) -> str:
        """runc's state root for `namespace`: like runc's shim, the `root` option (or
        /run/containerd/runc) with the namespace appended."""
        return os.path.join(self.root or DEFAULT_RUNC_ROOT_BASE, namespace)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ShimOptions:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise InvalidArgument(f"shim options file is not JSON: {err}") from None
        if not isinstance(data, dict):
            raise InvalidArgument("shim options file must hold a JSON object")
        return _from_mapping(cls, data, source=OPTIONS_FILE)


@dataclasses.dataclass(frozen=True)
class CheckpointRequestOptions:
    """The options of one Checkpoint call; defaults are runc's shim's defaults."""

    exit: bool = False
    open_tcp: bool = False
    external_unix_sockets: bool = False
    terminal: bool = False
    file_locks: bool = False
    empty_namespaces: tuple[str, ...] = ()
    cgroups_mode: str = ""
    image_path: str = ""
    work_path: str = ""


def decode_create_options(options: any_pb2.Any | None) -> ShimOptions:
    """Decode a CreateTaskRequest's (or `start`'s stdin) options Any."""
    if options is None or (not options.type_url and not options.value):
        return ShimOptions()
    from kybernate.protos import typeurl

    name = typeurl.full_name(options.type_url)
    if name == RUNC_OPTIONS:
        from kybernate.protos import runc_options_pb2

        msg = runc_options_pb2.Options.FromString(options.value)
        return ShimOptions(
            binary_name=msg.binary_name, root=msg.root, systemd_cgroup=msg.systemd_cgroup,
            no_pivot_root=msg.no_pivot_root, no_new_keyring=msg.no_new_keyring,
            shim_cgroup=msg.shim_cgroup, io_uid=msg.io_uid, io_gid=msg.io_gid,
            criu_path=msg.criu_path, criu_image_path=msg.criu_image_path,
            criu_work_path=msg.criu_work_path,
        )
    if name == LINUX_RUNC_CREATE_OPTIONS:
        from kybernate.protos import runctypes_pb2

        old = runctypes_pb2.CreateOptions.FromString(options.value)
        return ShimOptions(
            no_pivot_root=old.no_pivot_root, no_new_keyring=old.no_new_keyring,
            shim_cgroup=old.shim_cgroup, io_uid=old.io_uid, io_gid=old.io_gid,
            criu_image_path=old.criu_image_path, criu_work_path=old.criu_work_path,
        )
    if name == RUNTIME_OPTIONS:
        from kybernate.protos import runtimeoptions_pb2

        cri = runtimeoptions_pb2.Options.FromString(options.value)
        body = cri.config_body
        return _from_runtime_options(cri.config_path,
                                     body.encode() if isinstance(body, str) else bytes(body))
    raise InvalidArgument(f"unsupported create options type {options.type_url!r}: want "
                          f"{RUNC_OPTIONS}, {LINUX_RUNC_CREATE_OPTIONS} or {RUNTIME_OPTIONS}")


def decode_create_options_bytes(data: bytes) -> ShimOptions:
    """Decode a marshalled Any, as containerd writes it on `start`'s stdin."""
    from google.protobuf import any_pb2
    from google.protobuf.message import DecodeError

    try:
        options = any_pb2.Any.FromString(data)
    except DecodeError as err:
        raise InvalidArgument(f"create options are not a protobuf Any: {err}") from None
    return decode_create_options(options)


def decode_checkpoint_options(options: any_pb2.Any | None) -> CheckpointRequestOptions:
    """Decode a CheckpointTaskRequest's options Any (none sent: all defaults)."""
    if options is None or (not options.type_url and not options.value):
        return CheckpointRequestOptions()
    from kybernate.protos import typeurl

    name = typeurl.full_name(options.type_url)
    if name == RUNC_CHECKPOINT_OPTIONS:
        from kybernate.protos import runc_options_pb2

        msg: Any = runc_options_pb2.CheckpointOptions.FromString(options.value)
    elif name == LINUX_RUNC_CHECKPOINT_OPTIONS:
        from kybernate.protos import runctypes_pb2

        msg = runctypes_pb2.CheckpointOptions.FromString(options.value)
    else:
        raise InvalidArgument(f"unsupported checkpoint options type {options.type_url!r}: want "
                              f"{RUNC_CHECKPOINT_OPTIONS} or {LINUX_RUNC_CHECKPOINT_OPTIONS}")
    # Field numbers differ between the two forms; the names do not.
    return CheckpointRequestOptions(
        exit=msg.exit, open_tcp=msg.open_tcp, external_unix_sockets=msg.external_unix_sockets,
        terminal=msg.terminal, file_locks=msg.file_locks,
        empty_namespaces=tuple(msg.empty_namespaces), cgroups_mode=msg.cgroups_mode,
        image_path=msg.image_path, work_path=msg.work_path,
    )


def save_options(bundle: str, options: ShimOptions) -> None:
    """Write `options.json` in the bundle atomically (the server does this at Create)."""
    target = os.path.join(bundle, OPTIONS_FILE)
    tmp = f"{target}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(options.to_json())
    os.replace(tmp, target)


def load_options(bundle: str) -> ShimOptions | None:
    """The options saved in the bundle, or None when there are none (or no bundle)."""
    try:
        with open(os.path.join(bundle, OPTIONS_FILE)) as f:
            return ShimOptions.from_json(f.read())
    except FileNotFoundError:
        return None


# runc's Go field names, as they appear in a CRI runtime options TOML table.
_GO_FIELD_NAMES = {
    "BinaryName": "binary_name", "Root": "root", "SystemdCgroup": "systemd_cgroup",
    "NoPivotRoot": "no_pivot_root", "NoNewKeyring": "no_new_keyring",
    "ShimCgroup": "shim_cgroup", "IoUid": "io_uid", "IoGid": "io_gid",
    "CriuPath": "criu_path", "CriuImagePath": "criu_image_path",
    "CriuWorkPath": "criu_work_path",
}


def _from_runtime_options(config_path: str, config_body: bytes) -> ShimOptions:
    import tomllib

    if config_body:
        source, raw = "runtimeoptions config_body", config_body
    elif config_path:
        source = config_path
        try:
            with open(config_path, "rb") as f:
                raw = f.read()
        except OSError as err:
            raise InvalidArgument(f"cannot read runtime options file {config_path}: "
                                  f"{err.strerror}") from None
    else:
        return ShimOptions()
    try:
        table = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise InvalidArgument(f"runtime options in {source} are not valid TOML: {err}") from None
    # Keys that are not ShimOptions fields belong to other readers (Kybernate's own
    # settings may share the file), so they are left alone here.
    data = {_GO_FIELD_NAMES.get(key, key): value for key, value in table.items()}
    return _from_mapping(ShimOptions, data, source=source)


def _from_mapping(cls: type[ShimOptions], data: dict[str, Any], *, source: str) -> ShimOptions:
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name not in data:
            continue
        value = data[field.name]
        want = type(field.default)
        if want is int and isinstance(value, bool) or not isinstance(value, want):
            raise InvalidArgument(f"{source}: option {field.name} must be {want.__name__}, "
                                  f"got {type(value).__name__}")
        values[field.name] = value
    return cls(**values)
